"""The bridge between Slicer's MRML scene and DeepMultimodalRegLib.

Qt-free: it needs only MRML (from Slicer, or from the ``slicer-core`` package in tests), vtk, numpy
and the library, so the same code runs in the Slicer application, in its Python console, headless,
and in pytest.  The module's Widget stays a thin GUI over :class:`.logic.RegistrationLogic`.

Modules, one job each:

- ``coordinates``: the RAS↔LPS flip (the only place in the project where it happens);
- ``volumes``: scalar volume node ↔ library Volume with exact geometry;
- ``transform_nodes``: library transforms → linear / grid transform nodes ("from parent");
- ``roi``: Markups ROI node ↔ library Box in fixed-image LPS space;
- ``maps``: review maps (local similarity, Jacobian determinant, displacement) as volume nodes;
- ``parameters``: the parameter node's schema (every setting and node reference);
- ``jobs``: running library work off the GUI thread and handing results back to it;
- ``refinement``: ROI-driven region-specific refinement with history, undo and redo;
- ``logic``: registration from nodes to nodes.
"""
