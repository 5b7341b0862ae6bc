"""The course around the lessons: exercises from solutions, learner checkers, whole-course runs.

    python -m tld.course exercises            # write exercises/ from solutions/ (--check: only compare)
    python -m tld.course run --preset cpu     # run every lesson and solution with papermill into build/

``solutions/NN_topic.ipynb`` is the single source of the exercises (``tld.course.exercises``): in
its code cells the lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` become one
``raise NotImplementedError(...)``; in markdown cells the lines between ``<!-- BEGIN SOLUTION -->``
and ``<!-- END SOLUTION -->`` are dropped. Outputs are cleared.

A learner checks a function with ``check_<task>(fn)`` (``tld.course.checks``, one module per
lesson): it runs real cases against ``tld`` and, when something differs, raises ``CheckError``
(an ``AssertionError``) saying what: the shape, the largest error and where it is, and a hint for
the usual mistakes. ``tld.course.run`` executes every notebook with papermill; ``tld.course.cli``
is the command line.
"""

from __future__ import annotations

from .checks import (
    CHECKERS,
    CheckError,
    check_add_noise,
    check_attention,
    check_cfg_training_loss,
    check_classifier_guided,
    check_clip_loss,
    check_ddim_step,
    check_dpm_solver_2m_step,
    check_ema_update,
    check_eos_pool,
    check_fixed_point_inversion_step,
    check_gate,
    check_guidance,
    check_heun_step,
    check_latent_scale,
    check_log_snr,
    check_lr_at,
    check_midpoint_step,
    check_modulate,
    check_patchify,
    check_path_straightness,
    check_psnr,
    check_retrieval_accuracy,
    check_round_trip_error,
    check_sincos_2d,
    check_skip_fusion,
    check_split_heads,
    check_timestep_embedding,
    check_unpatchify,
    check_vae_kl,
    check_vae_sample,
)
from .cli import main
from .exercises import BEGIN, END, MD_BEGIN, MD_END, REPO, exercise_notebook, exercise_source, write_exercises
from .run import PRESETS, format_table, lessons, run_course

__all__ = [
    "BEGIN", "CHECKERS", "END", "MD_BEGIN", "MD_END", "PRESETS", "REPO", "CheckError", "exercise_notebook",
    "exercise_source", "format_table", "lessons", "main", "run_course", "write_exercises",
    "check_add_noise", "check_attention", "check_cfg_training_loss", "check_clip_loss", "check_ddim_step",
    "check_dpm_solver_2m_step", "check_ema_update", "check_eos_pool", "check_gate", "check_guidance",
    "check_latent_scale", "check_log_snr", "check_lr_at", "check_modulate", "check_patchify", "check_psnr",
    "check_retrieval_accuracy", "check_sincos_2d", "check_skip_fusion", "check_split_heads",
    "check_timestep_embedding", "check_unpatchify", "check_vae_kl", "check_vae_sample",
    "check_classifier_guided", "check_fixed_point_inversion_step", "check_round_trip_error", "check_heun_step",
    "check_midpoint_step", "check_path_straightness",
]
