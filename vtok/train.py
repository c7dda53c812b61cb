"""``python -m vtok.train``: the same as ``vtok train`` (the loop lives in ``vtok.eval.train``)."""

from __future__ import annotations

if __name__ == "__main__":
    from vtok.eval.train import main

    raise SystemExit(main())
