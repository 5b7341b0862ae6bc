"""The course around the lessons: exercises from solutions, learner checkers, whole-course runs.

    python -m tld.course exercises            # write exercises/ from solutions/ (--check: only compare)
    python -m tld.course run --preset cpu     # run every lesson and solution with papermill into build/

``solutions/NN_topic.ipynb`` is the single source of the exercises (``tld.course.exercises``): in
its code cells the lines between ``# BEGIN SOLUTION`` and ``# END SOLUTION`` become one
``raise NotImplementedError(...)``; in markdown cells the lines between ``<!-- BEGIN SOLUTION -->``
and ``<!-- END SOLUTION -->`` are dropped. Outputs are cleared.

Each lesson's tasks come in three tiers: *reproduce* what the lesson built, *extend* it with what
it did not write, *investigate* a measured question (the checker asserts the answer's range).
A learner checks a function with ``check_<task>(fn)`` (``tld.course.checks``, one module per
lesson): it runs real cases against ``tld``, smallest first, and when something differs raises
``CheckError`` (an ``AssertionError``) saying what in concepts: the shape, the largest error and
where it is, the property violated or the usual mistake recognised. Code-level hints come with
``check_<task>(fn, hint=2)`` or after ``CODE_HINTS_AFTER`` failures in a row; no hint prints the
answer. ``tld.course.run`` executes every notebook with papermill; ``tld.course.cli``
is the command line.
"""

from __future__ import annotations

from .checks import (
    CHECKERS,
    CODE_HINTS_AFTER,
    CheckError,
    check_add_noise,
    check_adherence_at,
    check_attention,
    check_bpe_merge,
    check_cfg_rescale,
    check_cfg_training_loss,
    check_chance_accuracy,
    check_circle_coverage,
    check_classifier_guided,
    check_clip_grad_norm,
    check_clip_loss,
    check_db_per_halving,
    check_ddim_step,
    check_ddpm_step,
    check_dit_block,
    check_dpm_solver_2m_step,
    check_ema_half_life,
    check_ema_update,
    check_eos_pool,
    check_fixed_point_inversion_step,
    check_flop_ratio,
    check_fold_kernels,
    check_frechet_distance,
    check_gate,
    check_guidance,
    check_heun_step,
    check_items_until_every_class,
    check_kid,
    check_latent_scale,
    check_linear_as_conv,
    check_log_snr,
    check_lr_at,
    check_masked_attention,
    check_midpoint_step,
    check_modulate,
    check_nearest_is_neighbour,
    check_parse_caption,
    check_patchify,
    check_path_straightness,
    check_peak_weight,
    check_psnr,
    check_psnr_per_image,
    check_real_fid,
    check_retrieval_accuracy,
    check_round_trip_error,
    check_run_blocks,
    check_sampler_error,
    check_sincos_2d,
    check_skip_fusion,
    check_skip_parameter_fraction,
    check_snr_one_time,
    check_split_heads,
    check_split_subgrids,
    check_timestep_embedding,
    check_unpatchify,
    check_v_target,
    check_vae_kl,
    check_vae_sample,
    check_zero_grad_fraction,
)
from .cli import main
from .exercises import BEGIN, END, MD_BEGIN, MD_END, REPO, exercise_notebook, exercise_source, write_exercises
from .run import PRESETS, format_table, lessons, run_course

__all__ = [
    "BEGIN", "CHECKERS", "CODE_HINTS_AFTER", "END", "MD_BEGIN", "MD_END", "PRESETS", "REPO", "CheckError",
    "exercise_notebook", "exercise_source", "format_table", "lessons", "main", "run_course", "write_exercises",
    "check_add_noise", "check_adherence_at", "check_attention", "check_bpe_merge", "check_cfg_rescale",
    "check_cfg_training_loss", "check_chance_accuracy", "check_circle_coverage", "check_clip_grad_norm",
    "check_clip_loss", "check_db_per_halving", "check_ddim_step", "check_ddpm_step", "check_dit_block",
    "check_dpm_solver_2m_step", "check_ema_half_life", "check_ema_update", "check_eos_pool", "check_flop_ratio",
    "check_fold_kernels", "check_frechet_distance", "check_gate", "check_guidance",
    "check_items_until_every_class", "check_kid", "check_latent_scale", "check_linear_as_conv", "check_log_snr",
    "check_lr_at", "check_masked_attention", "check_modulate", "check_nearest_is_neighbour", "check_parse_caption",
    "check_patchify", "check_peak_weight", "check_psnr", "check_psnr_per_image", "check_real_fid",
    "check_retrieval_accuracy", "check_run_blocks", "check_sampler_error", "check_sincos_2d", "check_skip_fusion",
    "check_skip_parameter_fraction", "check_snr_one_time", "check_split_heads", "check_split_subgrids",
    "check_timestep_embedding", "check_unpatchify", "check_v_target", "check_vae_kl", "check_vae_sample",
    "check_zero_grad_fraction",
    "check_classifier_guided", "check_fixed_point_inversion_step", "check_round_trip_error", "check_heun_step", "check_midpoint_step", "check_path_straightness",
]
