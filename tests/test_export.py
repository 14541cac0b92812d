"""lwdsl export: GGUF types hold lwdsl's stored codes exactly (checked against `gguf.quants`), the GGUF
file carries the source's metadata and every tensor back exactly, MLP widths are padded exactly, the HF
folder loads in transformers without lwdsl, bad input is a clean exit 2, and (where the benchmark
venv has llama-cpp-python) llama.cpp runs the file."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lwdsl.apply import kernels
from lwdsl.export.gguf_types import EXACT, encode, exact_float_type
from lwdsl.solution import LayerChoice, PruneChoice, QuantFormat, Solution

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
BENCH_PYTHON = next((Path(p) for p in (os.environ.get("LWDSL_BENCH_PYTHON"), ROOT / ".venv-bench/bin/python",
                                       ROOT.parent / ".venv-bench/bin/python") if p and Path(p).exists()),
                    ROOT / ".venv-bench/bin/python")  # llama-cpp-python, never a dependency of lwdsl


# --- bit layouts, against the gguf package's own dequantizer ----------------------------------------

@pytest.mark.parametrize("key", sorted(EXACT))
def test_each_exact_mapping_dequantizes_to_lwdsls_weights(key):
    dtype, group, symmetric = key
    torch.manual_seed(0)
    weight = torch.randn(48, 256) * torch.rand(48, 1)
    packed = kernels.quantize_linear_codes(weight, 8 if dtype == "int8" else 4, group, symmetric)
    name = EXACT[key]
    data = encode(name, packed.codes.numpy(), packed.scale.numpy(),
                  None if packed.offset is None else packed.offset.numpy())
    theirs = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[name])
    assert theirs.shape == (48, 256)
    assert np.array_equal(theirs, kernels.dequantize(packed).numpy())  # bit for bit: no second rounding


def test_q8_0_bytes_equal_ggufs_own_quantizer_on_lwdsls_grid():
    """On values already on a Q8_0 grid both quantizers agree byte for byte."""
    torch.manual_seed(1)
    grid = gguf.quants.dequantize(gguf.quants.quantize(np.random.randn(16, 128).astype(np.float32),
                                                       gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0)
    packed = kernels.quantize_linear_codes(torch.from_numpy(grid), 8, 32, True)
    ours = encode("Q8_0", packed.codes.numpy(), packed.scale.numpy(), None)
    assert np.array_equal(ours, gguf.quants.quantize(grid, gguf.GGMLQuantizationType.Q8_0))


def test_float_tensors_take_a_quantized_type_only_when_it_holds_them_exactly():
    values = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    on_grid = gguf.quants.dequantize(gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_1),
                                     gguf.GGMLQuantizationType.Q4_1)
    assert exact_float_type(on_grid, ("Q4_1",))[0] == "Q4_1"
    assert exact_float_type(values, ("Q4_1",))[0] == "F32"
    assert exact_float_type(values.astype(np.float16).astype(np.float32), ())[0] == "F16"


def test_zero_padding_adds_only_zero_channels():
    from lwdsl.export.gguf_file import _pad_mlp

    packed = kernels.quantize_linear_codes(torch.randn(4, 64), 4, 32, True)
    data = encode("Q4_0", packed.codes.numpy(), packed.scale.numpy(), None)
    wider = gguf.quants.dequantize(_pad_mlp("down_proj", data, 64, 128, "Q4_0"), gguf.GGMLQuantizationType.Q4_0)
    assert np.array_equal(wider[:, :64], kernels.dequantize(packed).numpy()) and not wider[:, 64:].any()
    taller = _pad_mlp("up_proj", np.ones((3, 5), np.float32), 3, 7, "F32")
    assert taller.shape == (7, 5) and not taller[3:].any()


# --- a real artifact: SmolLM2 with every exact format and per-layer channel pruning -----------------

def _solution(model) -> Solution:
    formats = {"q_proj": QuantFormat(dtype="int8", group=32), "k_proj": QuantFormat(dtype="int8", group=32),
               "v_proj": QuantFormat(dtype="int4", group=32), "o_proj": QuantFormat(dtype="int4", group=32),
               "gate_proj": QuantFormat(dtype="int4", group=32, symmetric=False),
               "up_proj": QuantFormat(dtype="int4", group=32, symmetric=False),
               "down_proj": QuantFormat(dtype="int8", group=32)}
    layers = []
    for index in range(model.config.num_hidden_layers):
        prune = PruneChoice(kind="channels", fraction=0.25 if index % 2 else 0.125)
        for leaf, fmt in formats.items():
            part = "mlp" if leaf.endswith(("gate_proj", "up_proj", "down_proj")) else "self_attn"
            layers.append(LayerChoice(name=f"model.layers.{index}.{part}.{leaf}", block=index, format=fmt,
                                      prune=prune if part == "mlp" else PruneChoice(), device="cpu0",
                                      compute_device="cpu0"))
    return Solution(plan_name="export-test", plan_hash="", status="OPTIMAL", layers=layers)


@pytest.fixture(autouse=True)
def _float32_prefill(monkeypatch):
    """lwdsl's own logits in float32: the export is exact to the stored codes, and a CPU whose probe
    chose bf16 prefill matmuls would round lwdsl's side only."""
    monkeypatch.setenv("LWDSL_PREFILL_DTYPE", "fp32")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory, smollm2_model, smollm2_gguf):
    from lwdsl.apply import DriverContext, apply_solution
    from lwdsl.artifact import file_sha256, save_artifact

    model, tokenizer = smollm2_model
    model = copy.deepcopy(model)
    solution = _solution(model)
    model = apply_solution(model, solution, DriverContext(device_kinds={"cpu0": "cpu"}))
    folder = tmp_path_factory.mktemp("export") / "artifact"
    return save_artifact(model, tokenizer, folder, solution=solution, source_model=f"gguf:{smollm2_gguf}",
                         source_hash=file_sha256(smollm2_gguf))


@pytest.fixture(scope="module")
def exported(artifact, tmp_path_factory):
    import lwdsl

    target = tmp_path_factory.mktemp("gguf") / "model.gguf"
    return lwdsl.export(artifact, "gguf", target)


@pytest.mark.model
@pytest.mark.slow
def test_gguf_holds_every_stored_weight_exactly(artifact, exported, smollm2_gguf):
    from lwdsl.export.gguf_file import _permute
    from lwdsl.export.view import read_view

    view = read_view(artifact)
    reader = gguf.GGUFReader(str(exported.path))
    source = gguf.GGUFReader(str(smollm2_gguf))
    widest = max(view.layer_width(i) for i in range(view.blocks))
    assert {view.layer_width(i) for i in range(view.blocks)} == {1152, 1344}  # really per-layer widths
    fields = reader.fields
    assert fields["llama.feed_forward_length"].parts[-1][0] == widest
    assert len(fields["tokenizer.ggml.tokens"].data) == len(source.fields["tokenizer.ggml.tokens"].data)
    assert bytes(fields["tokenizer.chat_template"].parts[-1]) == bytes(source.fields["tokenizer.chat_template"].parts[-1])
    tensors = {t.name: t for t in reader.tensors}
    expected_types = {"attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q4_0", "attn_output": "Q4_0",
                      "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q8_0"}
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for index in (0, 1, 29):
        for short, hf in names.items():
            tensor = tensors[f"blk.{index}.{short}.weight"]
            assert tensor.tensor_type.name == expected_types[short]
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            ours = view.float_weight(f"model.layers.{index}.{hf}").numpy()
            if short in ("attn_q", "attn_k"):
                heads = 9 if short == "attn_q" else 3
                ours = _permute(ours, heads)
            width = ours.shape[0] if short in ("ffn_gate", "ffn_up") else ours.shape[1]
            if short in ("ffn_gate", "ffn_up"):
                assert values.shape[0] == widest and not values[width:].any()
                values = values[:width]
            elif short == "ffn_down":
                assert values.shape[1] == widest and not values[:, width:].any()
                values = values[:, :width]
            assert np.array_equal(values, ours), (index, short)
    embedding = tensors["token_embd.weight"]
    assert embedding.tensor_type.name == "Q8_0"  # the source's own type holds the kept values exactly
    assert np.array_equal(gguf.quants.dequantize(embedding.data, embedding.tensor_type),
                          view.tensors["model.embed_tokens.weight"].numpy())
    assert "output.weight" not in tensors  # tied head


HF_LOGITS = ROOT / "bench" / "hf_logits.py"  # transformers alone: lwdsl must not import there


@pytest.mark.model
@pytest.mark.slow
def test_hf_folder_loads_in_transformers_alone_with_lwdsls_logits(artifact, tmp_path, repo_root):
    import lwdsl
    from lwdsl.artifact import load

    result = lwdsl.export(artifact, "hf", tmp_path / "hf")
    config = json.loads((result.path / "config.json").read_text())
    assert config["intermediate_size"] == 1344 and "quantization_config" not in config
    assert (result.path / "tokenizer.json").is_file() and not (result.path / "manifest.json").exists()
    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "ids.npy", ids.numpy())
    done = subprocess.run([sys.executable, str(HF_LOGITS), str(result.path), str(tmp_path / "ids.npy"),
                           str(repo_root)], capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = np.load(tmp_path / "ids.npy.logits.npy")
    with torch.inference_mode():
        ours = load(artifact)(input_ids=ids).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(ours).max()


def _transformers_logits(folder: Path, ids: torch.Tensor, tmp_path: Path, repo_root: Path) -> np.ndarray:
    np.save(tmp_path / "ids.npy", ids.numpy())
    done = subprocess.run([sys.executable, str(HF_LOGITS), str(folder), str(tmp_path / "ids.npy"), str(repo_root)],
                          capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert done.returncode == 0, done.stderr[-2000:]
    return np.load(tmp_path / "ids.npy.logits.npy")


@pytest.mark.model
@pytest.mark.slow
def test_hf_quantized_keeps_the_stored_codes_and_loads_in_transformers_alone(artifact, tmp_path, repo_root):
    pytest.importorskip("compressed_tensors")
    import lwdsl
    from lwdsl.artifact import load

    result = lwdsl.export(artifact, "hf-quantized", tmp_path / "hfq")
    config = json.loads((result.path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    schemes = {(g["weights"]["num_bits"], g["weights"]["strategy"], g["weights"]["group_size"]): g["targets"]
               for g in config["config_groups"].values()}
    assert set(schemes) == {(8, "group", 32), (4, "group", 32)}
    assert "model.layers.0.self_attn.v_proj" in schemes[(4, "group", 32)]
    assert "model.layers.0.mlp.gate_proj" in config["ignore"]  # asymmetric int4: exact floats instead
    ids = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(1))
    theirs = _transformers_logits(result.path, ids, tmp_path, repo_root)
    with torch.inference_mode():
        ours = load(artifact)(input_ids=ids).logits[0].numpy()
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(ours).max()


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.skipif(not BENCH_PYTHON.exists(), reason="no benchmark venv with llama-cpp-python")
def test_llamacpp_runs_the_export_as_lwdsl_does(artifact, exported, repo_root):
    from lwdsl.artifact import load, load_tokenizer
    from lwdsl.runtime.generate import decode

    tokenizer = load_tokenizer(artifact)
    prompt = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    ours = decode(load(artifact), prompt, 8, stop_at_eos=False).token_ids
    request = {"gguf": str(exported.path), "threads": 1, "prompt_ids": prompt[0].tolist(), "new_tokens": 8,
               "windows": [prompt[0].tolist()], "repeats": 1}
    done = subprocess.run([str(BENCH_PYTHON), str(repo_root / "bench" / "llamacpp_runner.py")],
                          input=json.dumps(request), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout)["generated"][:4] == ours[:4]


# --- bad input --------------------------------------------------------------------------------------

def test_bad_input_is_exit_2_and_writes_nothing(tmp_path):
    from lwdsl.cli import main

    target = tmp_path / "out.gguf"
    assert main(["export", str(tmp_path / "missing"), "--format", "gguf", "-o", str(target)]) == 2
    (tmp_path / "notartifact").mkdir()
    assert main(["export", str(tmp_path / "notartifact"), "--format", "hf", "-o", str(tmp_path / "hf")]) == 2
    assert main(["export", str(tmp_path / "notartifact"), "--format", "onnx", "-o", str(target)]) == 2
    target.write_text("keep me")
    assert main(["export", str(tmp_path / "notartifact"), "--format", "gguf", "-o", str(target)]) == 2
    assert target.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notartifact", "out.gguf"]


@pytest.mark.model
@pytest.mark.slow
def test_a_format_gguf_cannot_hold_is_named_unless_requantize(artifact, tmp_path):
    from lwdsl.errors import LwdslError
    from lwdsl.export.gguf_file import check_exportable
    from lwdsl.export.view import read_view

    view = read_view(artifact)
    name = "model.layers.3.self_attn.q_proj"
    layers = dict(view.manifest.layers)
    layers[name] = layers[name].model_copy(update={"format": QuantFormat(dtype="int4", group=128)})
    view.manifest = view.manifest.model_copy(update={"layers": layers})
    with pytest.raises(LwdslError) as error:
        check_exportable(view, requantize=False)
    message = error.value.diagnostics[0]
    assert message.code == "E681" and name in message.message and "int4 g128" in message.message
    assert "Q4_1" in message.hint
    assert check_exportable(view, requantize=True) == [(name, "int4 g128")]


@pytest.mark.model
@pytest.mark.slow
def test_requantize_rounds_the_named_layers_to_the_nearest_gguf_type_and_lists_them(artifact, smollm2_gguf, tmp_path):
    from lwdsl.export.gguf_file import write_gguf
    from lwdsl.export.view import read_view

    view = read_view(artifact)
    name = "model.layers.2.self_attn.o_proj"
    weight = view.float_weight(name)
    packed = kernels.quantize_linear_codes(weight, 8, None, True)  # int8 per channel: no GGUF type
    view.tensors.update({f"{name}.codes": packed.codes, f"{name}.scale": packed.scale})
    layers = dict(view.manifest.layers)
    layers[name] = layers[name].model_copy(update={"format": QuantFormat(dtype="int8")})
    view.manifest = view.manifest.model_copy(update={"layers": layers})
    result = write_gguf(view, tmp_path / "re.gguf", smollm2_gguf, requantize=True)
    assert [(r.name, r.stored, r.gguf_type) for r in result.requantized] == [(name, "int8", "Q8_0")]
    assert result.requantized[0].ppl_after < result.requantized[0].ppl_before  # g32 beats per channel (priors)
    tensor = next(t for t in gguf.GGUFReader(str(tmp_path / "re.gguf")).tensors if t.name == "blk.2.attn_output.weight")
    assert tensor.tensor_type.name == "Q8_0"
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    reference = kernels.dequantize(packed).numpy()
    assert np.abs(values - reference).max() <= np.abs(reference).max() / 127  # within one Q8_0 step
