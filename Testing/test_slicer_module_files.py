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
    tree = ast.parse(MODULE.read_text())
    heavy = {"torch", "DeepMultimodalRegLib", "monai", "torchdiffeq", "numpy", "SimpleITK"}
    assert not (_top_level_imports(tree) & heavy)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {"DeepMultimodalReg", "DeepMultimodalRegWidget", "DeepMultimodalRegLogic", "DeepMultimodalRegTest"} <= classes


def test_module_method_list_matches_the_library_catalogue():
    from DeepMultimodalRegLib.methods import METHODS

    tree = ast.parse(MODULE.read_text())
    listed = next(ast.literal_eval(n.value) for n in tree.body
                  if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "METHODS" for t in n.targets))
    assert tuple(listed) == tuple(METHODS)
    ui_methods = [item.find("property/string").text
                  for w in ET.parse(UI).getroot().iter("widget") if w.get("name") == "methodComboBox"
                  for item in w.findall("item")]
    assert ui_methods == list(METHODS)


def test_ui_has_every_widget_the_module_uses():
    widgets = {w.get("name") for w in ET.parse(UI).getroot().iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    assert used, "the module uses no widgets from its .ui?"
    assert used <= widgets, f"missing in the .ui: {sorted(used - widgets)}"


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
