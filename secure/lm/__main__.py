"""``python -m secure.lm``: the same as ``python -m secure.lm.train``."""

from secure.lm.train import main

raise SystemExit(main())
