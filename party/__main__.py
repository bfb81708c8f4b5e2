"""``python -m party --config cluster.json --party N``: run one party node."""

from party.node import main

if __name__ == "__main__":
    raise SystemExit(main())
