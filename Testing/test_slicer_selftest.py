"""Runs the module's own self-test (DeepMultimodalRegTest) on real MRML from slicer-core.

Slicer's application pieces that slicer-core lacks are replaced by small stand-ins, each doing
what the application does for the self-test and no more: the ScriptedLoadableModule base classes
(the parameter-node singleton lookup, unittest's assertions), ``slicer.mrmlScene``, translation
(``tr``), and ``loadVolume`` (here through MRML's own volume archetype reader).  What only the
real application can check — the widgets, the Qt timer, the view layout — is left to Slicer.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest

import pytest

from conftest import REPO

slicer = pytest.importorskip("slicer", reason="slicer-core provides MRML")
pytest.importorskip("monai", reason="the deep registration needs MONAI")


class _ScriptedLoadableModuleLogic:
    """What Slicer's ScriptedLoadableModuleLogic does for the Logic: the parameter-node singleton."""

    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = scene.AddNode(node)
        return node


class _ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=1000):
        print(message)


@pytest.fixture()
def module(monkeypatch, tmp_path):
    scene = slicer.vtkMRMLScene()
    colours = slicer.vtkMRMLColorLogic()
    colours.SetMRMLScene(scene)
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    slm.ScriptedLoadableModule = type("ScriptedLoadableModule", (), {})
    slm.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})
    slm.ScriptedLoadableModuleLogic = _ScriptedLoadableModuleLogic
    slm.ScriptedLoadableModuleTest = _ScriptedLoadableModuleTest
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", slm)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))

    def load_volume(path, properties={}, returnNode=False):
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", scene.GenerateUniqueName("volume"))
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        assert storage.ReadData(node), path
        node.SetAndObserveStorageNodeID(storage.GetID())
        return node

    monkeypatch.setattr(slicer.util, "loadVolume", load_volume)
    monkeypatch.syspath_prepend(str(REPO / "DeepMultimodalReg"))
    spec = importlib.util.spec_from_file_location("DeepMultimodalReg", REPO / "DeepMultimodalReg" / "DeepMultimodalReg.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    yield loaded, scene
    colours.SetMRMLScene(None)
    scene.Clear(1)


def _run(module, name):
    loaded, scene = module
    test = loaded.DeepMultimodalRegTest(methodName=name)
    test.setUp = lambda: scene.Clear(0)
    test.setUp()
    getattr(test, name)()


def test_self_test_module_loads(module):
    _run(module, "test_ModuleLoads")


def test_self_test_rigid_disa(module):
    _run(module, "test_RigidDisaRecoversAKnownMotion")


def test_self_test_roi_refinement(module):
    _run(module, "test_RoiRefinementChangesTheBoxMoreThanOutside")
