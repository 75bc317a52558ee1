from scalelm.cli import main

raise SystemExit(main())
