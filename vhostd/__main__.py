from vhostd.cli import main

raise SystemExit(main())
