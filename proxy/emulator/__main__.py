"""``python -m proxy.emulator``: the emulator without the proxy's CLI."""

from proxy.emulator.cli import main

raise SystemExit(main())
