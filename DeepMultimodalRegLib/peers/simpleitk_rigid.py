"""SimpleITK's rigid registration with Mattes mutual information: the classical multimodal peer.

Used by the demo and the benchmarks as the reference a deep method has to beat; it returns the
library's own result type so every report is made the same way.
"""

from __future__ import annotations

import time

from ..image.volume import Volume
from ..progress import CancelToken, ProgressCallback, no_progress
from ..result import RegistrationResult
from ..transforms.itk_io import from_sitk
from ..transforms.resample import warp_volume


def sampling_seed(seed: int) -> int:
    """SimpleITK's metric-sampling seed for ours: SimpleITK reads 0 as 'seed from the wall clock'
    (sitkWallClock), so ours is shifted by one and every seed, 0 included, repeats its samples."""
    return int(seed) + 1


def register_rigid_mattes(fixed: Volume, moving: Volume, iterations: int = 200, seed: int = 0,
                          progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                          sampling_fraction: float = 0.1) -> RegistrationResult:
    """Multi-resolution (4-2-1) rigid registration, Mattes MI, regular-step gradient descent."""
    import SimpleITK as sitk

    progress = progress or no_progress
    start = time.perf_counter()
    f = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    m = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    initial = sitk.CenteredTransformInitializer(f, m, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(sampling_fraction, sampling_seed(seed))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-4, numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    evaluations = {"n": 0}

    def on_iteration():
        evaluations["n"] += 1
        if cancel is not None and cancel.cancelled:
            reg.StopRegistration()
        level = reg.GetCurrentLevel()
        progress((level + min(1.0, reg.GetOptimizerIteration() / iterations)) / 3, f"level {level + 1}/3")

    reg.AddCommand(sitk.sitkIterationEvent, on_iteration)
    before = reg.MetricEvaluate(f, m)
    out = reg.Execute(f, m)
    if cancel is not None:
        cancel.raise_if_cancelled()
    transform = from_sitk(out)
    warped = warp_volume(moving.float(), transform, fixed.geometry)
    seconds = time.perf_counter() - start
    figures = {"mattes_mi_before": float(before), "mattes_mi_after": float(reg.GetMetricValue()),
               "iterations": evaluations["n"], "stop": reg.GetOptimizerStopConditionDescription()[:120]}
    return RegistrationResult("simpleitk-rigid-mattes", transform, warped, fixed, moving, figures=figures,
                              device="cpu (SimpleITK)", seconds=seconds)
