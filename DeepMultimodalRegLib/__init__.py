"""DeepMultimodalReg: deep-learning multimodal image registration (DISA-LC², RSO, SOPI, MS-ODE).

The backend library of the DeepMultimodalReg Slicer extension; pure Python and torch, usable from
plain Python, the ``deepmmreg`` command line and Slicer's Python console.  Conventions: physical
space is LPS mm, arrays are (z, y, x), a transform maps fixed-space points to moving-space points.
"""

__version__ = "0.1.0"
