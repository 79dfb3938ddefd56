from sidecar.router.main import main

raise SystemExit(main())
