"""Reports of a registration: ``report.json`` (figures, times, versions) and ``report.png``
(before/after overlays, checkerboards and differences in three planes).

matplotlib is imported only when a figure is drawn, so importing this package stays light.
"""

from .figures import checkerboard, middle_slices, normalise_for_display, report_panels, write_report_png
from .report_json import to_jsonable, write_report_json

__all__ = ["write_report_json", "write_report_png", "checkerboard", "normalise_for_display", "middle_slices",
           "report_panels", "to_jsonable"]
