"""``python -m DeepMultimodalRegLib.training.msode_flow OUT.pt``: write the untrained B-spline gradient flow
(:mod:`DeepMultimodalRegLib.msode.flow`, where it lives because registration builds it too) to a file."""

from ..msode.flow import DEFAULT_FLOW_RATE, DEFAULT_FLOW_SOLVERS, bspline_flow, main  # noqa: F401

if __name__ == "__main__":
    raise SystemExit(main())
