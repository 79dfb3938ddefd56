"""``python -m sidecar.controller``: the same as the ``kvmove-controller`` console script."""

from sidecar.controller.main import main

raise SystemExit(main())
