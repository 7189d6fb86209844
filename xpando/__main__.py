from xpando.cli import main

raise SystemExit(main())
