from microserve.cli import main

raise SystemExit(main())
