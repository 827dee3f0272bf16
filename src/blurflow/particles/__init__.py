"""Particle mode: the 3D motion of each tracer particle (a bead) from one exposure, by a
maximum-likelihood fit of the motion PSF to its streak. One module a job:

- :mod:`~blurflow.particles.fit`: the fit of one bead a window (BeadFitter, FitResult);
- :mod:`~blurflow.particles.detection`: the streaks of an image and their windows;
- :mod:`~blurflow.particles.frames`: the beads of a stack of frames, neighbours fitted together;
- :mod:`~blurflow.particles.scoring`: the bead test sets scored, the Cramér-Rao bound map.
"""

from blurflow.particles.detection import MASK_GROWTH_PX, TOUCH_PX, Detection, detect, neighbour_pairs, windows
from blurflow.particles.fit import MOTION, PARAMS, POOR_FIT, BeadFitter, FitResult, canonical, resolved
from blurflow.particles.frames import Particles, fit_frames, joint_std, place
from blurflow.particles.scoring import TRAINING_VARIANCE, bead_scores, cramer_rao_map, fit_dense_testset, fit_testset, match

__all__ = [
    "MASK_GROWTH_PX", "MOTION", "PARAMS", "POOR_FIT", "TOUCH_PX", "TRAINING_VARIANCE", "BeadFitter", "Detection", "FitResult", "Particles",
    "bead_scores", "canonical", "cramer_rao_map", "detect", "fit_dense_testset", "fit_frames", "fit_testset", "joint_std", "match",
    "neighbour_pairs", "place", "resolved", "windows",
]  # fmt: skip
