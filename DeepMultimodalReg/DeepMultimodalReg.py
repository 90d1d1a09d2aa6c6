"""3D Slicer scripted module of the DeepMultimodalReg extension.

The module stays light at import time: it imports neither torch nor the
backend library ``DeepMultimodalRegLib``. Both are imported lazily by the
Logic, after ``DeepMultimodalRegLogic.ensureDependencies`` has installed what
is missing, with the user's agreement.
"""

import importlib
import importlib.util
import logging
import os
import sys

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#
# Constants shared by the Widget, the Logic and the tests
#

#: Name of the backend package. At run time it sits next to this file
#: (installed extension) or one folder up (source checkout).
LIBRARY_PACKAGE = "DeepMultimodalRegLib"

#: Registration methods, as the command line spells them (``--method``).
METHODS = (
    "disa-rigid",
    "disa-affine",
    "disa-deformable",
    "mind-rigid",
    "mind-affine",
    "mind-deformable",
    "lc2-rigid",
    "msode-rigid",
    "msode-bspline",
    "msode-dense",
    "msode-hybrid",
    "deep",
)
SEARCH_MODES = ("local", "global")
DEVICES = ("auto", "cpu", "cuda")

#: The settings the module sets before the library is imported (the bridge's schema,
#: DeepMultimodalRegMRML.parameters, fills in the rest when it is first used).
DEFAULT_PARAMETERS = {
    "Method": METHODS[0],
    "Search": SEARCH_MODES[0],
    "Device": DEVICES[0],
}

#: Bridge package (Qt-free, next to this file): MRML nodes <-> library; see its __init__.
BRIDGE_PACKAGE = "DeepMultimodalRegMRML"

#: Widgets of the .ui bound to the parameter node (their "SlicerParameterName" property) and their class.
PARAMETER_WIDGETS = {
    "fixedVolumeSelector": "qMRMLNodeComboBox",
    "movingVolumeSelector": "qMRMLNodeComboBox",
    "fixedMaskSelector": "qMRMLNodeComboBox",
    "movingMaskSelector": "qMRMLNodeComboBox",
    "methodComboBox": "QComboBox",
    "searchComboBox": "QComboBox",
    "startsSpinBox": "QSpinBox",
    "rangeDegSpinBox": "QSpinBox",
    "rangeMmSpinBox": "QSpinBox",
    "refineComboBox": "QComboBox",
    "deviceComboBox": "QComboBox",
    "outputTransformSelector": "qMRMLNodeComboBox",
    "outputVolumeSelector": "qMRMLNodeComboBox",
    "showMovingUnderTransformCheckBox": "QCheckBox",
    "computeMapsCheckBox": "QCheckBox",
    "roiSelector": "qMRMLNodeComboBox",
    "autoRefineCheckBox": "QCheckBox",
    "rsoIterationsSpinBox": "QSpinBox",
    "rsoCropCheckBox": "QCheckBox",
    "rsoSpacingSpinBox": "QDoubleSpinBox",
    "isoIterationsSpinBox": "QSpinBox",
    "ctVolumeSelector": "qMRMLNodeComboBox",
    "xrayVolumeSelector": "qMRMLNodeComboBox",
    "method2d3dComboBox": "QComboBox",
}

#: Other widgets the module code uses, and their class.
ACTION_WIDGETS = {
    "applyButton": "QPushButton",
    "cancelButton": "QPushButton",
    "progressBar": "QProgressBar",
    "statusLabel": "QLabel",
    "deviceInfoLabel": "QLabel",
    "placeRoiButton": "QPushButton",
    "placeRoiAtWorstButton": "QPushButton",
    "refineButton": "QPushButton",
    "isoButton": "QPushButton",
    "historyListWidget": "QListWidget",
    "undoButton": "QPushButton",
    "redoButton": "QPushButton",
    "showWarpedButton": "QPushButton",
    "showSimilarityButton": "QPushButton",
    "showJacobianButton": "QPushButton",
    "geometryPathLineEdit": "ctkPathLineEdit",
    "sopiModelPathLineEdit": "ctkPathLineEdit",
    "msodeWeightsPathLineEdit": "ctkPathLineEdit",
    "msodeRigidWeightsPathLineEdit": "ctkPathLineEdit",
    "register2d3dButton": "QPushButton",
    "showDrrButton": "QPushButton",
}

#: The path fields and the settings they edit (bound by the Widget: slicer.util does not bind ctkPathLineEdit).
PATH_SETTINGS = {
    "geometryPathLineEdit": "GeometryFile",
    "sopiModelPathLineEdit": "SopiModelDir",
    "msodeWeightsPathLineEdit": "MsodeWeights",
    "msodeRigidWeightsPathLineEdit": "MsodeRigidWeights",
}

#: How often the GUI looks at a running job (progress bar, result) in milliseconds.
POLL_INTERVAL_MS = 200

#: Minimum torch version (``torch.load(..., weights_only=True)`` and current APIs).
TORCH_REQUIREMENT = ">=2.0"

#: Python dependencies other than torch: import name -> pip requirement.
PIP_DEPENDENCIES = {
    "monai": "monai",
    "torchdiffeq": "torchdiffeq",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "tqdm": "tqdm",
}

#: Distributions that Slicer (or the PyTorch extension) provides. Installing the
#: dependencies must never replace them: their installed versions are pinned
#: through a pip constraints file, so pip fails rather than swaps them.
PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "vtk", "torch", "torchvision")


#
# DeepMultimodalReg
#


class DeepMultimodalReg(ScriptedLoadableModule):
    """Module description shown in Slicer's module panel and Help section."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep Multimodal Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepMultimodalReg developers"]
        self.parent.helpText = _("""
Deep-learning registration of images of different modalities (for example MR to CT, or MR to ultrasound).
Choose the fixed and the moving volume, a method and where the result goes, then click Apply.
<ul>
<li><b>disa-*</b>: a small CNN whose features approximate the LC<sup>2</sup> similarity (rigid, affine, deformable);
use <i>global</i> search for a wide capture range.</li>
<li><b>mind-*</b>, <b>lc2-rigid</b>: classical MIND-SSC and LC<sup>2</sup> similarities, for comparison.</li>
<li><b>msode-*</b>: a learned multi-scale neural-ODE optimiser (rigid, B-spline, dense, hybrid). A preliminary rigid model ships (reliable up to about ±25° from the start; use <i>global</i> search for larger turns: 27 starting rotations, about twice the time); msode-bspline and msode-hybrid's B-spline stage run an untrained MIND-SSC gradient flow unless you choose a trained model under <i>MS-ODE model</i> (no trained B-spline model ships); msode-dense needs one; <i>MS-ODE rigid stage</i> replaces the shipped rigid model.</li>
<li><b>deep</b>: a general deep deformable model that can then be refined inside a box you draw.</li>
</ul>
Computation runs on a CUDA GPU when there is one (device <i>auto</i>) and on the CPU otherwise.
The Python packages it needs (PyTorch, MONAI, torchdiffeq) are installed on first use, after you agree.
""")
        self.parent.acknowledgementText = _("""
This module implements methods from the following publications:
<ul>
<li>DISA-LC<sup>2</sup>: M. Ronchetti, W. Wein, N. Navab, O. Zettinig, R. Prevost, "DISA: Differentiable Similarity
Approximation for Universal Multimodal Registration", MICCAI 2023.</li>
<li>RSO: T. Bai, M. Lin, X. Liang, B. Wang, M. Dohopolski, B. Cai, D. Nguyen, S. Jiang, "Region Specific Optimization
(RSO)-based Deep Interactive Registration", 2023.</li>
<li>SOPI: M. Chen, Z. Zhang, S. Gu, Y. Kong, "Embedded Feature Similarity Optimization with Specific Parameter
Initialization for 2D/3D Medical Image Registration", 2023.</li>
<li>MS-ODE: J. Xu, E. Z. Chen, X. Chen, T. Chen, S. Sun, "Multi-scale Neural ODEs for 3D Medical Image
Registration", MICCAI 2021.</li>
</ul>
It is built on 3D Slicer, PyTorch, SimpleITK, MONAI and torchdiffeq.
""")


#
# DeepMultimodalRegWidget
#


class DeepMultimodalRegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """GUI only: binds the .ui to the parameter node and hands every action to the Logic.

    Heavy work runs in a background job; a Qt timer polls it on the GUI thread, which is the only
    thread that touches MRML (the job's result is applied there).
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False
        self._job = None
        self._parameterEditWidgets = []
        self._pollTimer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepMultimodalReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepMultimodalRegLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Each bound widget names its parameter in the .ui ("SlicerParameterName").
        self._parameterEditWidgets = [
            (getattr(self.ui, name), getattr(self.ui, name).property("SlicerParameterName")) for name in PARAMETER_WIDGETS
        ]
        slicer.util.addParameterEditWidgetConnections(self._parameterEditWidgets, self.updateParameterNodeFromGUI)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.placeRoiButton.connect("clicked(bool)", lambda: self.onPlaceRoi(atWorstSimilarity=False))
        self.ui.placeRoiAtWorstButton.connect("clicked(bool)", lambda: self.onPlaceRoi(atWorstSimilarity=True))
        self.ui.refineButton.connect("clicked(bool)", self.onRefineButton)
        self.ui.isoButton.connect("clicked(bool)", self.onIsoButton)
        self.ui.undoButton.connect("clicked(bool)", lambda: self._runGuarded(self.logic.refinement.undo))
        self.ui.redoButton.connect("clicked(bool)", lambda: self._runGuarded(self.logic.refinement.redo))
        self.ui.showWarpedButton.connect("clicked(bool)", lambda: self.onShow("OutputVolume"))
        self.ui.showSimilarityButton.connect("clicked(bool)", lambda: self.onShow("SimilarityMap"))
        self.ui.showJacobianButton.connect("clicked(bool)", lambda: self.onShow("JacobianMap"))
        # ctkPathLineEdit is not among slicer.util's parameter-bound widget classes: bound here
        for widgetName in PATH_SETTINGS:
            getattr(self.ui, widgetName).connect("currentPathChanged(QString)", self.updateParameterNodeFromGUI)
        self.ui.register2d3dButton.connect("clicked(bool)", self.onRegister2D3DButton)
        self.ui.showDrrButton.connect("clicked(bool)", self.onShowDrr)
        self.ui.progressBar.setValue(0)

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(POLL_INTERVAL_MS)
        self._pollTimer.connect("timeout()", self.onPollJob)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._job is not None:
            self._job.cancel()
        if self._pollTimer is not None:
            self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()
        self._showDeviceInfo()

    def exit(self) -> None:
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        if self._job is not None:
            self._job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # ------------------------------------------------------------------ parameter node <-> GUI
    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        self.logic.setDefaultParameters(parameterNode)
        if not parameterNode.GetNodeReference("FixedVolume"):
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                parameterNode.SetNodeReferenceID("FixedVolume", firstVolumeNode.GetID())
        self.setParameterNode(parameterNode)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode is not None and self.hasObserver(
            self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode
        ):
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            slicer.util.updateParameterEditWidgetsFromNode(self._parameterEditWidgets, self._parameterNode)
            for widgetName, setting in PATH_SETTINGS.items():
                getattr(self.ui, widgetName).currentPath = self._parameterNode.GetParameter(setting)
            self._updateButtonStates()
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        try:
            slicer.util.updateNodeFromParameterEditWidgets(self._parameterEditWidgets, self._parameterNode)
            for widgetName, setting in PATH_SETTINGS.items():
                self._parameterNode.SetParameter(setting, getattr(self.ui, widgetName).currentPath)
        finally:
            self._parameterNode.EndModify(wasModified)
        roi = self._parameterNode.GetNodeReference("RefinementROI")
        if roi is not None and self.logic.refinement is not None:
            self.logic.refinement.attach(roi)

    def _updateButtonStates(self) -> None:
        node = self._parameterNode
        busy = self._job is not None
        ready = bool(node.GetNodeReference("FixedVolume") and node.GetNodeReference("MovingVolume"))
        self.ui.applyButton.enabled = ready and not busy
        self.ui.applyButton.toolTip = (
            _("Register the moving volume to the fixed volume.") if ready else _("Select the fixed and moving volumes.")
        )
        self.ui.cancelButton.enabled = busy or bool(self.logic.refinement and self.logic.refinement.busy)
        refinable = self.logic.refinement is not None and self.logic.hasDeepSession()
        for button in (self.ui.placeRoiButton, self.ui.placeRoiAtWorstButton, self.ui.isoButton):
            button.enabled = refinable
        self.ui.refineButton.enabled = refinable and node.GetNodeReference("RefinementROI") is not None
        self.ui.undoButton.enabled = refinable and len(self.logic.refinement.history()) > 1
        self.ui.redoButton.enabled = refinable and self.logic.refinement.session.can_redo
        self.ui.showSimilarityButton.enabled = node.GetNodeReference("SimilarityMap") is not None
        self.ui.showJacobianButton.enabled = node.GetNodeReference("JacobianMap") is not None
        self.ui.showWarpedButton.enabled = node.GetNodeReference("OutputVolume") is not None
        self.ui.register2d3dButton.enabled = not busy and bool(
            node.GetNodeReference("CTVolume") and node.GetNodeReference("XRayVolume") and node.GetParameter("GeometryFile")
        )
        self.ui.showDrrButton.enabled = node.GetNodeReference("DRRVolume") is not None

    def _showDeviceInfo(self) -> None:
        if self.logic.missingDependencies():
            self.ui.deviceInfoLabel.text = _("PyTorch is installed on first use (you will be asked).")
            return
        summary, explanation = self.logic.deviceReport()
        self.ui.deviceInfoLabel.text = f"{summary}: {explanation}"

    # ------------------------------------------------------------------ actions
    def _runGuarded(self, action, *args) -> None:
        with slicer.util.tryWithErrorDisplay(_("The action failed."), waitCursor=True):
            action(*args)
        self._refreshHistory()
        self._updateButtonStates()

    def onApplyButton(self) -> None:
        if not self.logic.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Registration could not start."), waitCursor=True):
            self._watch(self.logic.startRegistrationFromParameterNode(onDone=self._onRegistrationDone))

    def onRegister2D3DButton(self) -> None:
        if not self.logic.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("2D/3D registration could not start."), waitCursor=True):
            self._watch(self.logic.start2D3DFromParameterNode(onDone=self._on2D3DDone))

    def _on2D3DDone(self, outputs) -> None:
        self._parameterNode.SetNodeReferenceID("DRRVolume", outputs.drr_node.GetID())
        self._parameterNode.SetNodeReferenceID("PoseTransform", outputs.transform_node.GetID())
        self.ui.statusLabel.text = outputs.summary

    def onShowDrr(self) -> None:
        xray = self._parameterNode.GetNodeReference("XRayVolume")
        drr = self._parameterNode.GetNodeReference("DRRVolume")
        if xray is not None and drr is not None:
            slicer.util.setSliceViewerLayers(background=xray, foreground=drr, foregroundOpacity=0.5, fit=True)

    def onRefineButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Refinement could not start."), waitCursor=True):
            self._watch(self.logic.refinement.refine(self._parameterNode.GetNodeReference("RefinementROI")))

    def onIsoButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Refinement could not start."), waitCursor=True):
            self._watch(self.logic.refinement.iso())

    def onPlaceRoi(self, atWorstSimilarity: bool) -> None:
        center = None if atWorstSimilarity else self._viewCenterRas()
        with slicer.util.tryWithErrorDisplay(_("Could not place the box."), waitCursor=True):
            roi = self.logic.refinement.place_roi(center_ras=center)
            self._parameterNode.SetNodeReferenceID("RefinementROI", roi.GetID())
            self.ui.statusLabel.text = _("Drag the box handles over the region to refine; releasing them refines it.")

    @staticmethod
    def _viewCenterRas():
        sliceNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode()
        sliceToRas = sliceNode.GetSliceToRAS()
        return [sliceToRas.GetElement(row, 3) for row in range(3)]

    def onShow(self, role: str) -> None:
        fixed = self._parameterNode.GetNodeReference("FixedVolume")
        overlay = self._parameterNode.GetNodeReference(role)
        if fixed is not None and overlay is not None:
            slicer.util.setSliceViewerLayers(background=fixed, foreground=overlay, foregroundOpacity=0.5, fit=False)

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._job.cancel()
        if self.logic.refinement is not None:
            self.logic.refinement.cancel()
        self.ui.statusLabel.text = _("Cancelling... the scene is left as it was.")

    # ------------------------------------------------------------------ background jobs
    def _watch(self, job) -> None:
        """Follow ``job`` (a registration or a refinement) until it ends."""
        self._job = job
        self.ui.progressBar.setValue(0)
        self._pollTimer.start()
        self._updateButtonStates()

    def onPollJob(self) -> None:
        refinementJob = self.logic.refinement.job if self.logic.refinement is not None else None
        if refinementJob is not None and refinementJob is not self._job and refinementJob.status == "running":
            self._job = refinementJob  # an auto-refine step started by releasing the ROI
        job = self._job
        if job is None:
            self._pollTimer.stop()
            return
        self.ui.progressBar.setValue(int(100 * job.fraction))
        self.ui.statusLabel.text = job.message
        try:
            status = job.poll()  # applies the result to the scene here, on the GUI thread
        except Exception as error:  # applying to the scene failed
            status = "failed"
            slicer.util.errorDisplay(_("Could not show the result: {error}").format(error=error))
        if status == "running":
            return
        self._job = None
        if status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
        elif status == "failed":
            slicer.util.errorDisplay(str(job.error))
            self.ui.statusLabel.text = _("Failed: {error}").format(error=job.error)
        elif job.name in ("rso", "iso"):
            self.ui.statusLabel.text = _("Refined in {seconds:.1f} s.").format(seconds=job.seconds)
        self._refreshHistory()
        self._updateButtonStates()

    def _onRegistrationDone(self, outputs) -> None:
        self.ui.statusLabel.text = outputs.summary
        roi = self._parameterNode.GetNodeReference("RefinementROI")
        if roi is not None and self.logic.refinement is not None:
            self.logic.refinement.attach(roi)

    def _refreshHistory(self) -> None:
        self.ui.historyListWidget.clear()
        if self.logic.refinement is not None and self.logic.hasDeepSession():
            for line in self.logic.refinement.history():
                self.ui.historyListWidget.addItem(line)


#
# DeepMultimodalRegLogic
#


class DeepMultimodalRegLogic(ScriptedLoadableModuleLogic):
    """Slicer-side entry point: dependencies, then the Qt-free bridge (``DeepMultimodalRegMRML``).

    Usable from the Python console::

        logic = slicer.util.getModuleLogic("DeepMultimodalReg")
        outputs = logic.register(fixedNode, movingNode, method="disa-rigid")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._bridge = None
        self.refinement = None

    def setDefaultParameters(self, parameterNode) -> None:
        """Fill in the settings that are not set yet (kept light: no library import needed)."""
        for name, value in DEFAULT_PARAMETERS.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

    # ------------------------------------------------------------------
    # The bridge (imports torch and the library: only after ensureDependencies)

    @property
    def bridge(self):
        if self._bridge is None:
            self.importLibrary()
            logicModule = importlib.import_module(BRIDGE_PACKAGE + ".logic")
            refinementModule = importlib.import_module(BRIDGE_PACKAGE + ".refinement")
            self._bridge = logicModule.RegistrationLogic(slicer.mrmlScene)
            self.refinement = refinementModule.RoiRefinement(self._bridge)
            importlib.import_module(BRIDGE_PACKAGE + ".parameters").set_defaults(self.getParameterNode())
        return self._bridge

    def hasDeepSession(self) -> bool:
        return self._bridge is not None and self._bridge.deep_session is not None

    def deviceReport(self):
        self.importLibrary()
        from DeepMultimodalRegLib.device import device_report

        return device_report()

    def register(self, fixedVolumeNode, movingVolumeNode, method: str = METHODS[0], **kwargs):
        """Blocking registration (console, self-test); returns the bridge's RegistrationOutputs."""
        return self.bridge.register(fixedVolumeNode, movingVolumeNode, method=method, **kwargs)

    def startRegistrationFromParameterNode(self, onDone=None):
        """Registration off the GUI thread with every setting from the parameter node."""
        bridge = self.bridge
        parameters = importlib.import_module(BRIDGE_PACKAGE + ".parameters")
        node = self.getParameterNode()
        settings = parameters.settings(node)
        return bridge.start_registration(
            node.GetNodeReference("FixedVolume"),
            node.GetNodeReference("MovingVolume"),
            method=settings["Method"],
            settings=settings,
            output_transform_node=node.GetNodeReference("OutputTransform"),
            output_volume_node=node.GetNodeReference("OutputVolume"),
            fixed_mask_node=node.GetNodeReference("FixedMask"),
            moving_mask_node=node.GetNodeReference("MovingMask"),
            on_done=onDone,
        )

    def start2D3DFromParameterNode(self, onDone=None):
        """CT-to-X-ray registration off the GUI thread, settings and nodes from the parameter node."""
        _ = self.bridge  # imports the library and creates the bridge
        logic2d3d = importlib.import_module(BRIDGE_PACKAGE + ".logic2d3d")
        parameters = importlib.import_module(BRIDGE_PACKAGE + ".parameters")
        node = self.getParameterNode()
        settings = parameters.settings(node)
        return logic2d3d.start_2d3d(
            slicer.mrmlScene,
            node.GetNodeReference("CTVolume"),
            node.GetNodeReference("XRayVolume"),
            settings["GeometryFile"],
            method=settings["Method2D3D"],
            model_dir=settings["SopiModelDir"],
            device=settings["Device"],
            seed=settings["Seed"],
            on_done=onDone,
        )

    def getParameterNode(self):
        """The same singleton node as the bridge's (one schema, see DeepMultimodalRegMRML.parameters)."""
        return ScriptedLoadableModuleLogic.getParameterNode(self)

    # ------------------------------------------------------------------
    # Files next to the module

    @staticmethod
    def moduleDirectory() -> str:
        return os.path.dirname(os.path.abspath(__file__))

    @staticmethod
    def libraryParentDirectory():
        """Folder that holds the DeepMultimodalRegLib package, or None.

        Installed extension: next to this file. Source checkout: one folder up.
        """
        moduleDirectory = DeepMultimodalRegLogic.moduleDirectory()
        for candidate in (moduleDirectory, os.path.dirname(moduleDirectory)):
            if os.path.isfile(os.path.join(candidate, LIBRARY_PACKAGE, "__init__.py")):
                return candidate
        return None

    @staticmethod
    def sampleDataDirectory():
        """Folder of the bundled sample volumes, or None.

        Installed extension: Resources/SampleData of this module.
        Source checkout: the top-level Resources/SampleData.
        """
        moduleDirectory = DeepMultimodalRegLogic.moduleDirectory()
        for candidate in (
            os.path.join(moduleDirectory, "Resources", "SampleData"),
            os.path.join(os.path.dirname(moduleDirectory), "Resources", "SampleData"),
        ):
            if os.path.isdir(candidate):
                return candidate
        return None

    def sampleDataFiles(self) -> list:
        """Paths of the bundled sample volumes (``*.nii.gz``), sorted."""
        directory = self.sampleDataDirectory()
        if directory is None:
            return []
        return sorted(
            os.path.join(directory, name) for name in os.listdir(directory) if name.endswith(".nii.gz")
        )

    def loadSampleVolume(self, fileName: str):
        """Load a bundled sample volume (e.g. ``"mr_brain_t1.nii.gz"``) into the scene."""
        directory = self.sampleDataDirectory()
        path = os.path.join(directory, fileName) if directory else None
        if path is None or not os.path.isfile(path):
            raise ValueError(_("Sample volume not found: {fileName}").format(fileName=fileName))
        return slicer.util.loadVolume(path)

    # ------------------------------------------------------------------
    # Backend library and its dependencies (all imported lazily)

    def importLibrary(self):
        """Import and return the DeepMultimodalRegLib package.

        When the module is loaded from a source checkout the package sits one
        folder above the module, which Slicer does not put on sys.path: add it.
        """
        if self._findSpec(LIBRARY_PACKAGE) is None:
            parentDirectory = self.libraryParentDirectory()
            if parentDirectory is not None and parentDirectory not in sys.path:
                sys.path.append(parentDirectory)
                importlib.invalidate_caches()
        try:
            return importlib.import_module(LIBRARY_PACKAGE)
        except ModuleNotFoundError as error:
            if error.name == LIBRARY_PACKAGE:
                raise RuntimeError(
                    _("The {package} package was not found next to the module ({path}). Reinstall the extension.").format(
                        package=LIBRARY_PACKAGE, path=self.moduleDirectory()
                    )
                ) from error
            raise

    @staticmethod
    def _findSpec(name):
        try:
            return importlib.util.find_spec(name)
        except (ImportError, ValueError):
            return None

    def missingDependencies(self) -> list:
        """Import names of the required packages that are not installed (nothing is imported)."""
        names = ["torch", *PIP_DEPENDENCIES]
        return [name for name in names if self._findSpec(name) is None]

    def ensureDependencies(self, askUser: bool = True) -> bool:
        """Install the missing Python dependencies; return True when all are available.

        PyTorch comes from Slicer's PyTorch extension (PyTorchUtils, which picks the
        build matching the GPU driver) when it is installed, else from pip. The other
        packages come from pip. With ``askUser`` the user confirms first; declining
        returns False and changes nothing. Slicer's own numpy, SimpleITK and vtk (and
        an installed torch) are never replaced.
        """
        missing = self.missingDependencies()
        if not missing:
            return True

        pyTorchUtils = None
        if "torch" in missing:
            try:
                import PyTorchUtils as pyTorchUtils  # Slicer's PyTorch extension
            except ImportError:
                pyTorchUtils = None

        if askUser:
            lines = []
            if "torch" in missing:
                if pyTorchUtils is not None:
                    lines.append(_("PyTorch, through the PyTorch extension (the build that matches your GPU driver)"))
                else:
                    lines.append(_("PyTorch, from the Python Package Index"))
            lines.extend(PIP_DEPENDENCIES[name] for name in missing if name in PIP_DEPENDENCIES)
            message = _(
                "Deep Multimodal Registration needs these Python packages, which will be downloaded and installed now "
                "(this can take several minutes):\n\n{packages}\n\nContinue?"
            ).format(packages="\n".join("- " + line for line in lines))
            if not slicer.util.confirmOkCancelDisplay(message):
                logging.info("DeepMultimodalReg: installation of the dependencies was cancelled by the user.")
                return False

        if "torch" in missing:
            if pyTorchUtils is not None:
                torch = pyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT
                )
                if torch is None:
                    return False
            else:
                logging.info(
                    "DeepMultimodalReg: the PyTorch extension is not installed; installing torch with pip. "
                    "Install the PyTorch extension to get the build that matches your GPU driver."
                )
                self._pipInstall(["torch" + TORCH_REQUIREMENT])

        pipRequirements = [PIP_DEPENDENCIES[name] for name in missing if name in PIP_DEPENDENCIES]
        if pipRequirements:
            self._pipInstall(pipRequirements)

        importlib.invalidate_caches()
        stillMissing = self.missingDependencies()
        if stillMissing:
            raise RuntimeError(
                _("These Python packages could not be installed: {packages}. See the Python console for details.").format(
                    packages=", ".join(stillMissing)
                )
            )
        return True

    @staticmethod
    def _protectedConstraints() -> list:
        """``name==version`` for each protected distribution that is installed."""
        import importlib.metadata

        constraints = []
        for name in PROTECTED_DISTRIBUTIONS:
            try:
                constraints.append(f"{name}=={importlib.metadata.version(name)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        return constraints

    def _pipInstall(self, requirements: list) -> None:
        """pip install ``requirements`` without replacing the protected distributions."""
        import tempfile

        constraints = self._protectedConstraints()
        with tempfile.TemporaryDirectory(prefix="DeepMultimodalReg-") as directory:
            constraintsPath = os.path.join(directory, "constraints.txt")
            with open(constraintsPath, "w", encoding="utf-8") as constraintsFile:
                constraintsFile.write("\n".join(constraints) + "\n")
            logging.info(f"DeepMultimodalReg: pip install {' '.join(requirements)} (constraints: {constraints})")
            # A list is passed to pip as separate arguments (the path may contain spaces);
            # this form is accepted by slicer.util.pip_install in Slicer 5.6 and later.
            slicer.util.pip_install([*requirements, "-c", constraintsPath])


#
# DeepMultimodalRegTest
#


class DeepMultimodalRegTest(ScriptedLoadableModuleTest):
    """Self-test (Reload & Test, ctest): no network; the sample volumes that ship with the module."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ModuleLoads()
        self.setUp()
        self.test_RigidDisaRecoversAKnownMotion()
        self.setUp()
        self.test_RoiRefinementChangesTheBoxMoreThanOutside()

    def test_ModuleLoads(self):
        self.delayDisplay("Starting test_ModuleLoads")
        logic = DeepMultimodalRegLogic()
        library = logic.importLibrary()
        self.assertEqual(library.__name__, LIBRARY_PACKAGE)
        self.assertTrue(library.__version__)
        self.assertTrue(set(logic.missingDependencies()) <= {"torch", *PIP_DEPENDENCIES})
        self.delayDisplay("test_ModuleLoads passed")

    def _requireDependencies(self, logic, names):
        """The self-test needs no network: it skips (saying why) rather than install packages."""
        missing = [name for name in logic.missingDependencies() if name in names]
        if missing:
            self.skipTest(f"not installed: {', '.join(missing)} (Apply installs them after asking)")

    def _snapshot(self, node):
        import numpy as np

        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return np.array(slicer.util.arrayFromVolume(node)), [matrix.GetElement(r, c) for r in range(4) for c in range(4)]

    def _assertUnchanged(self, node, snapshot):
        import numpy as np

        now = self._snapshot(node)
        self.assertTrue(np.array_equal(now[0], snapshot[0]), f"{node.GetName()}: voxels changed")
        self.assertEqual(now[1], snapshot[1], f"{node.GetName()}: geometry changed")

    def _movedCopy(self, logic, fixedNode, sourceNode, name):
        """``sourceNode`` moved by a known rigid motion (5°, 6 mm), as a new volume node, and that motion."""
        import math

        import torch

        logic.importLibrary()
        from DeepMultimodalRegLib.evaluation import misaligned_copy
        from DeepMultimodalRegLib.transforms.linear import RigidTransform

        volumes = importlib.import_module(BRIDGE_PACKAGE + ".volumes")
        source = volumes.volume_from_node(sourceNode)
        fixed = volumes.volume_from_node(fixedNode)
        truth = RigidTransform(torch.tensor([[math.radians(5), 0.0, math.radians(-4), 6.0, -3.0, 2.0]],
                                            dtype=torch.float64), torch.as_tensor(fixed.geometry.center))
        return volumes.node_from_volume(slicer.mrmlScene, misaligned_copy(source, truth), name=name), truth, fixed

    def test_RigidDisaRecoversAKnownMotion(self):
        self.delayDisplay("Starting test_RigidDisaRecoversAKnownMotion (a minute on a CPU)")
        import numpy as np
        import torch

        logic = DeepMultimodalRegLogic()
        self._requireDependencies(logic, ("torch", "scipy"))
        fixedNode = logic.loadSampleVolume("mr_brain_t1.nii.gz")
        t2Node = logic.loadSampleVolume("mr_brain_t2.nii.gz")
        movingNode, truth, fixed = self._movedCopy(logic, fixedNode, t2Node, "T2 moved")
        before = {node: self._snapshot(node) for node in (fixedNode, movingNode)}

        outputs = logic.register(fixedNode, movingNode, method="disa-rigid", settings={"Device": "cpu"})

        coordinates = importlib.import_module(BRIDGE_PACKAGE + ".coordinates")
        transformNodes = importlib.import_module(BRIDGE_PACKAGE + ".transform_nodes")
        points = fixed.geometry.center + np.random.default_rng(0).uniform(-30, 30, size=(20, 3))
        expected = truth.transform_points(torch.as_tensor(points))[0].numpy()
        found = coordinates.lps_from_ras_points(
            transformNodes.transform_points_ras(outputs.transform_node, coordinates.lps_from_ras_points(points)))
        error = float(np.linalg.norm(found - expected, axis=1).mean())
        initial = float(np.linalg.norm(expected - points, axis=1).mean())
        # The shipped DISA weights land within a few mm on this pair (docs/benchmarks.md); the known
        # motion is ~8 mm, so the error must at least be halved.
        self.assertLess(error, 0.5 * initial, f"DISA rigid error {error:.1f} mm from {initial:.1f} mm")
        for node, snapshot in before.items():
            self._assertUnchanged(node, snapshot)
        self.assertIs(movingNode.GetParentTransformNode(), outputs.transform_node)
        self.delayDisplay(f"test_RigidDisaRecoversAKnownMotion passed: {initial:.1f} mm -> {error:.1f} mm")

    def test_RoiRefinementChangesTheBoxMoreThanOutside(self):
        self.delayDisplay("Starting test_RoiRefinementChangesTheBoxMoreThanOutside")
        import numpy as np

        logic = DeepMultimodalRegLogic()
        self._requireDependencies(logic, ("torch", "monai"))
        fixedNode = logic.loadSampleVolume("ct_pelvis.nii.gz")
        movingNode, _, fixed = self._movedCopy(logic, fixedNode, fixedNode, "pelvis moved")
        before = {node: self._snapshot(node) for node in (fixedNode, movingNode)}
        settings = {"Device": "cpu", "IsoIterations": 5, "RsoIterations": 20, "ComputeMaps": False}
        outputs = logic.register(fixedNode, movingNode, method="deep", settings=settings)
        parameters = importlib.import_module(BRIDGE_PACKAGE + ".parameters")
        parameterNode = logic.getParameterNode()
        for name, value in settings.items():
            parameters.set(parameterNode, name, value)
        fieldBefore = slicer.util.arrayFromGridTransform(outputs.transform_node).copy()

        coordinates = importlib.import_module(BRIDGE_PACKAGE + ".coordinates")
        roi = logic.refinement.place_roi(center_ras=coordinates.ras_from_lps_points(fixed.geometry.center),
                                         size_mm=(60.0, 60.0, 45.0))
        roi.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)  # as releasing a handle does
        self.assertIsNotNone(logic.refinement.job)
        self.assertEqual(logic.refinement.job.wait(timeout=900), "succeeded", str(logic.refinement.job.error))
        change = np.linalg.norm(slicer.util.arrayFromGridTransform(outputs.transform_node) - fieldBefore, axis=-1)

        from DeepMultimodalRegLib.region import Box

        box = Box(tuple(fixed.geometry.center), (60.0, 60.0, 45.0))
        inside = box.mask(fixed.geometry).numpy()
        outside = ~Box(tuple(fixed.geometry.center), (120.0, 120.0, 90.0)).mask(fixed.geometry).numpy()
        self.assertGreater(change[inside].mean(), 2 * change[outside].mean())
        for node, snapshot in before.items():
            self._assertUnchanged(node, snapshot)
        self.delayDisplay("test_RoiRefinementChangesTheBoxMoreThanOutside passed")
