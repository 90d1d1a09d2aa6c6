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

#: Parameter-node parameters and their defaults.
DEFAULT_PARAMETERS = {
    "Method": METHODS[0],
    "Search": SEARCH_MODES[0],
    "Device": DEVICES[0],
}

#: Parameter-node reference roles of the node selectors.
FIXED_VOLUME_ROLE = "FixedVolume"
MOVING_VOLUME_ROLE = "MovingVolume"
OUTPUT_TRANSFORM_ROLE = "OutputTransform"
OUTPUT_VOLUME_ROLE = "OutputVolume"

#: Minimum torch version (``torch.load(..., weights_only=True)`` and current APIs).
TORCH_REQUIREMENT = ">=2.0"

#: Python dependencies other than torch: import name -> pip requirement.
PIP_DEPENDENCIES = {
    "monai": "monai",
    "torchdiffeq": "torchdiffeq",
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
<li><b>msode-*</b>: a learned multi-scale neural-ODE optimiser (rigid, B-spline, dense, hybrid).</li>
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
    """GUI only: selectors, method options, Apply / progress / Cancel.

    Everything that computes goes through :class:`DeepMultimodalRegLogic`.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._updatingGUIFromParameterNode = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        # Load the widget from the .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepMultimodalReg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # The .ui connects the top-level qMRMLWidget's mrmlSceneChanged(vtkMRMLScene*)
        # signal to each node selector's setMRMLScene(vtkMRMLScene*) slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DeepMultimodalRegLogic()

        # Keep the parameter node valid across scene close.
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # GUI -> parameter node
        for selector in self._nodeSelectors().values():
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        for comboBox in self._comboBoxes().values():
            comboBox.connect("currentIndexChanged(int)", self.updateParameterNodeFromGUI)

        # Buttons
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.cancelButton.enabled = False
        self.ui.progressBar.setValue(0)

        self.initializeParameterNode()

    def _nodeSelectors(self):
        return {
            FIXED_VOLUME_ROLE: self.ui.fixedVolumeSelector,
            MOVING_VOLUME_ROLE: self.ui.movingVolumeSelector,
            OUTPUT_TRANSFORM_ROLE: self.ui.outputTransformSelector,
            OUTPUT_VOLUME_ROLE: self.ui.outputVolumeSelector,
        }

    def _comboBoxes(self):
        return {
            "Method": self.ui.methodComboBox,
            "Search": self.ui.searchComboBox,
            "Device": self.ui.deviceComboBox,
        }

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes while the module is not shown.
        if self._parameterNode:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameterNode = self.logic.getParameterNode()
        self.logic.setDefaultParameters(parameterNode)
        # Save a few clicks: preselect the first volume as the fixed volume.
        if not parameterNode.GetNodeReference(FIXED_VOLUME_ROLE):
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                parameterNode.SetNodeReferenceID(FIXED_VOLUME_ROLE, firstVolumeNode.GetID())
        self.setParameterNode(parameterNode)

    def setParameterNode(self, inputParameterNode) -> None:
        """Set and observe the parameter node (the GUI follows its changes)."""
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
            for role, selector in self._nodeSelectors().items():
                selector.setCurrentNode(self._parameterNode.GetNodeReference(role))
            for name, comboBox in self._comboBoxes().items():
                index = comboBox.findText(self._parameterNode.GetParameter(name))
                if index >= 0:
                    comboBox.setCurrentIndex(index)
            self._updateApplyButtonState()
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, caller=None, event=None) -> None:
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        wasModified = self._parameterNode.StartModify()
        try:
            for role, selector in self._nodeSelectors().items():
                self._parameterNode.SetNodeReferenceID(role, selector.currentNodeID)
            for name, comboBox in self._comboBoxes().items():
                self._parameterNode.SetParameter(name, comboBox.currentText)
        finally:
            self._parameterNode.EndModify(wasModified)

    def _updateApplyButtonState(self) -> None:
        fixedVolume = self._parameterNode.GetNodeReference(FIXED_VOLUME_ROLE)
        movingVolume = self._parameterNode.GetNodeReference(MOVING_VOLUME_ROLE)
        outputTransform = self._parameterNode.GetNodeReference(OUTPUT_TRANSFORM_ROLE)
        outputVolume = self._parameterNode.GetNodeReference(OUTPUT_VOLUME_ROLE)
        if fixedVolume and movingVolume and (outputTransform or outputVolume):
            self.ui.applyButton.toolTip = _("Register the moving volume to the fixed volume.")
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select the fixed and moving volumes and an output transform or volume.")
            self.ui.applyButton.enabled = False

    def onApplyButton(self) -> None:
        """Run the registration (placeholder until the full GUI lands)."""
        parameterNode = self._parameterNode
        notAvailable = None
        self.logic.importLibrary()
        from DeepMultimodalRegLib.errors import NotAvailableError

        # tryWithErrorDisplay shows any other error (with details) and re-raises it.
        with slicer.util.tryWithErrorDisplay(_("Registration failed."), waitCursor=True):
            try:
                self.logic.register(
                    parameterNode.GetNodeReference(FIXED_VOLUME_ROLE),
                    parameterNode.GetNodeReference(MOVING_VOLUME_ROLE),
                    method=parameterNode.GetParameter("Method"),
                    search=parameterNode.GetParameter("Search"),
                    device=parameterNode.GetParameter("Device"),
                    outputTransformNode=parameterNode.GetNodeReference(OUTPUT_TRANSFORM_ROLE),
                    outputVolumeNode=parameterNode.GetNodeReference(OUTPUT_VOLUME_ROLE),
                )
            except NotAvailableError as error:
                notAvailable = error
        if notAvailable is not None:
            # Shown after the wait cursor is restored; not an error with a traceback.
            slicer.util.errorDisplay(str(notAvailable))

    def onCancelButton(self) -> None:
        self.logic.requestCancel()


#
# DeepMultimodalRegLogic
#


class DeepMultimodalRegLogic(ScriptedLoadableModuleLogic):
    """Bridge between MRML nodes and DeepMultimodalRegLib; usable without the GUI.

    The parameter node is the plain ``vtkMRMLScriptedModuleNode`` returned by
    ``getParameterNode()`` (inherited from ScriptedLoadableModuleLogic).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._cancelRequested = False

    # ------------------------------------------------------------------
    # Parameters

    def setDefaultParameters(self, parameterNode) -> None:
        """Fill in the parameters that are not set yet."""
        for name, value in DEFAULT_PARAMETERS.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, value)

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

    # ------------------------------------------------------------------
    # Registration

    def requestCancel(self) -> None:
        """Ask the running registration to stop (inputs and earlier results stay untouched)."""
        self._cancelRequested = True

    @property
    def cancelRequested(self) -> bool:
        return self._cancelRequested

    def register(
        self,
        fixedVolumeNode,
        movingVolumeNode,
        method: str = METHODS[0],
        search: str = SEARCH_MODES[0],
        device: str = DEVICES[0],
        outputTransformNode=None,
        outputVolumeNode=None,
    ):
        """Register the moving volume to the fixed volume.

        For now the inputs are checked, then the library's NotAvailableError says
        what is missing (the method itself, or the MRML bridge of the GUI issue).
        """
        if fixedVolumeNode is None or movingVolumeNode is None:
            raise ValueError(_("Select both a fixed and a moving volume."))
        if fixedVolumeNode is movingVolumeNode:
            raise ValueError(_("The fixed and the moving volume are the same node; select two different volumes."))
        for node in (fixedVolumeNode, movingVolumeNode):
            if node.GetImageData() is None:
                raise ValueError(_("Volume '{name}' has no image data.").format(name=node.GetName()))
        if method not in METHODS:
            raise ValueError(
                _("Unknown method '{method}'. Choose one of: {methods}.").format(method=method, methods=", ".join(METHODS))
            )
        if search not in SEARCH_MODES:
            raise ValueError(_("Unknown search mode '{search}'. Choose local or global.").format(search=search))
        if device not in DEVICES:
            raise ValueError(_("Unknown device '{device}'. Choose auto, cpu or cuda.").format(device=device))
        if outputTransformNode is None and outputVolumeNode is None:
            raise ValueError(_("Select an output transform or an output volume."))

        self._cancelRequested = False
        self.importLibrary()
        from DeepMultimodalRegLib.errors import NotAvailableError
        from DeepMultimodalRegLib.methods import get_method

        get_method(method)  # says which methods have not landed in the library yet
        raise NotAvailableError(
            _("Running '{method}' from the Slicer module comes with the module's MRML bridge; "
              "use the deepmmreg command line for now.").format(method=method)
        )


#
# DeepMultimodalRegTest
#


class DeepMultimodalRegTest(ScriptedLoadableModuleTest):
    """Self-test, run by Slicer's Reload & Test and by ctest."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ModuleLoads()
        self.setUp()
        self.test_ParameterDefaults()
        self.setUp()
        self.test_RegisterChecksInputs()

    def test_ModuleLoads(self):
        self.delayDisplay("Starting test_ModuleLoads")
        logic = DeepMultimodalRegLogic()
        self.assertIsNotNone(logic)

        library = logic.importLibrary()
        self.assertEqual(library.__name__, LIBRARY_PACKAGE)
        self.assertTrue(hasattr(library, "__version__"), f"{LIBRARY_PACKAGE}.__version__ is missing")
        self.assertIsInstance(library.__version__, str)
        self.assertTrue(library.__version__)

        missing = logic.missingDependencies()
        self.assertTrue(set(missing) <= {"torch", *PIP_DEPENDENCIES})
        self.delayDisplay("test_ModuleLoads passed")

    def test_ParameterDefaults(self):
        self.delayDisplay("Starting test_ParameterDefaults")
        logic = DeepMultimodalRegLogic()
        parameterNode = logic.getParameterNode()
        parameterNode.SetParameter("Search", "global")
        logic.setDefaultParameters(parameterNode)
        self.assertEqual(parameterNode.GetParameter("Method"), "disa-rigid")
        self.assertEqual(parameterNode.GetParameter("Device"), "auto")
        # A value already set is kept.
        self.assertEqual(parameterNode.GetParameter("Search"), "global")
        # The same node is returned on the next call.
        self.assertEqual(logic.getParameterNode().GetID(), parameterNode.GetID())
        self.delayDisplay("test_ParameterDefaults passed")

    def test_RegisterChecksInputs(self):
        self.delayDisplay("Starting test_RegisterChecksInputs")
        import numpy as np

        logic = DeepMultimodalRegLogic()
        fixed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "fixed")
        moving = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "moving")
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTransformNode", "result")

        with self.assertRaises(ValueError):
            logic.register(None, moving, outputTransformNode=transform)
        with self.assertRaises(ValueError):  # no image data yet
            logic.register(fixed, moving, outputTransformNode=transform)

        slicer.util.updateVolumeFromArray(fixed, np.zeros((4, 5, 6), dtype=np.float32))
        slicer.util.updateVolumeFromArray(moving, np.ones((4, 5, 6), dtype=np.float32))
        with self.assertRaises(ValueError):
            logic.register(fixed, fixed, outputTransformNode=transform)
        with self.assertRaises(ValueError):
            logic.register(fixed, moving, method="no-such-method", outputTransformNode=transform)
        with self.assertRaises(ValueError):
            logic.register(fixed, moving)  # no output selected
        self.delayDisplay("test_RegisterChecksInputs passed")
