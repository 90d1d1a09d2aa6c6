"""What can be checked of the Slicer module without the Slicer application: the module file stays
light at import, its method list matches the library's catalogue, the .ui holds every widget the
module uses, and the CMake files name files that exist."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET

from conftest import REPO

MODULE = REPO / "DeepMultimodalReg" / "DeepMultimodalReg.py"
UI = REPO / "DeepMultimodalReg" / "Resources" / "UI" / "DeepMultimodalReg.ui"


def _top_level_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_module_imports_nothing_heavy_at_import_time():
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    heavy = {"torch", "DeepMultimodalRegLib", "monai", "torchdiffeq", "numpy", "SimpleITK"}
    assert not (_top_level_imports(tree) & heavy)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"DeepMultimodalReg", "DeepMultimodalRegWidget", "DeepMultimodalRegLogic", "DeepMultimodalRegTest"} <= classes


def test_module_method_list_matches_the_library_catalogue():
    from DeepMultimodalRegLib.methods import METHODS

    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    listed = next(ast.literal_eval(n.value) for n in tree.body
                  if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "METHODS" for t in n.targets))
    assert tuple(listed) == tuple(METHODS)
    ui_methods = [item.find("property/string").text
                  for w in ET.parse(UI).getroot().iter("widget") if w.get("name") == "methodComboBox"
                  for item in w.findall("item")]
    assert ui_methods == list(METHODS)


def _module_constant(name: str):
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    return next(ast.literal_eval(n.value) for n in tree.body
                if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == name for t in n.targets))


def test_ui_has_every_widget_the_module_uses_with_the_expected_class():
    classes = {w.get("name"): w.get("class") for w in ET.parse(UI).getroot().iter("widget")}
    declared = {**_module_constant("PARAMETER_WIDGETS"), **_module_constant("ACTION_WIDGETS")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8"))) | set(_module_constant("PARAMETER_WIDGETS"))
    assert used, "the module uses no widgets from its .ui?"
    assert used <= set(declared), f"used but not declared with a class: {sorted(used - set(declared))}"
    wrong = {name: (classes.get(name), cls) for name, cls in declared.items() if classes.get(name) != cls}
    assert not wrong, f"missing or of another class in the .ui (found, expected): {wrong}"


def test_bound_widgets_name_settings_or_node_roles_of_the_bridge_schema():
    import sys

    sys.path.insert(0, str(REPO / "DeepMultimodalReg"))
    try:
        from DeepMultimodalRegMRML import parameters as P
    finally:
        sys.path.pop(0)
    root = ET.parse(UI).getroot()
    names = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                names[widget.get("name")] = prop.find("string").text
    assert set(names) == set(_module_constant("PARAMETER_WIDGETS"))
    for widget, name in names.items():
        assert name in P.SETTINGS or name in P.REFERENCE_ROLES, (widget, name)
    # node selectors bind node roles, the other widgets bind settings
    for widget, cls in _module_constant("PARAMETER_WIDGETS").items():
        assert (names[widget] in P.REFERENCE_ROLES) == (cls == "qMRMLNodeComboBox"), widget


def test_path_fields_edit_settings_of_the_bridge_schema():
    """The Widget binds its ctkPathLineEdit fields itself (PATH_SETTINGS): each is a path field of the .ui,
    declared with its class, and edits a string setting of the parameter node."""
    import sys

    sys.path.insert(0, str(REPO / "DeepMultimodalReg"))
    try:
        from DeepMultimodalRegMRML import parameters as P
    finally:
        sys.path.pop(0)
    classes = {w.get("name"): w.get("class") for w in ET.parse(UI).getroot().iter("widget")}
    paths = _module_constant("PATH_SETTINGS")
    assert {"msodeWeightsPathLineEdit", "msodeRigidWeightsPathLineEdit"} <= set(paths)
    for widget, setting in paths.items():
        assert classes.get(widget) == _module_constant("ACTION_WIDGETS").get(widget) == "ctkPathLineEdit", widget
        assert P.SETTINGS[setting].kind is str, setting


_IMPORT_WITHOUT_TORCH = """
import importlib.abc, importlib.util, sys, types

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"torch", "DeepMultimodalRegLib", "monai", "torchdiffeq", "numpy", "SimpleITK"}:
            raise ImportError(f"{name} is blocked: the module must not import it at import time")
        return None

sys.meta_path.insert(0, Block())
# stand-ins for what only the Slicer application provides
slicer = types.ModuleType("slicer"); slicer.__path__ = []
i18n = types.ModuleType("slicer.i18n"); i18n.tr = lambda text: text; i18n.translate = lambda context, text: text
slm = types.ModuleType("slicer.ScriptedLoadableModule")
for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
             "ScriptedLoadableModuleWidget"):
    setattr(slm, name, type(name, (), {}))
util = types.ModuleType("slicer.util"); util.VTKObservationMixin = type("VTKObservationMixin", (), {})
slicer.i18n, slicer.ScriptedLoadableModule, slicer.util = i18n, slm, util
sys.modules.update({"slicer": slicer, "slicer.i18n": i18n, "slicer.ScriptedLoadableModule": slm,
                    "slicer.util": util, "qt": types.ModuleType("qt"), "vtk": types.ModuleType("vtk")})
spec = importlib.util.spec_from_file_location("DeepMultimodalReg", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print("imported", len(module.METHODS), "methods")
"""


def test_module_file_imports_without_torch_or_the_library(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "import_module.py"
    script.write_text(_IMPORT_WITHOUT_TORCH)
    run = subprocess.run([sys.executable, str(script), str(MODULE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "imported" in run.stdout


def test_cmake_files_name_existing_files_and_extension_metadata():
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_DEPENDS", "add_subdirectory(DeepMultimodalReg)"):
        assert key in top
    module_cmake = (REPO / "DeepMultimodalReg" / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module_cmake and "WITH_GENERIC_TESTS" in module_cmake
    for resource in re.findall(r"(Resources/\S+\.(?:png|ui))", module_cmake):
        path = REPO / "DeepMultimodalReg" / resource.replace("${MODULE_NAME}", "DeepMultimodalReg")
        assert path.exists(), path
