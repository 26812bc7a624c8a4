"""``python -m bench``: the balance bench (``bench/balance/harness.py``)."""

from .balance.harness import main

raise SystemExit(main())
