"""``python3 -m picchat`` runs the server."""

from .cli import server_main

raise SystemExit(server_main())
