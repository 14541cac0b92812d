from lwdsl.cli import main

raise SystemExit(main())
