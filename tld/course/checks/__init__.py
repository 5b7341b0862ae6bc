"""Learner checkers, one module per lesson.

A learner checks a function with ``check_<task>(fn)``: it runs real cases against ``tld`` and,
when something differs, raises ``CheckError`` (an ``AssertionError``) saying what: the shape, the
largest error and where it is, and a concept-level hint for the usual mistakes; ``hint=2`` (or a
third failure in a row) adds a code-level hint (``common``). An *investigate* checker also asserts
the measured answer's range and prints it. ``CHECKERS`` maps each task (the name without
``check_``) to its checker.
"""

from __future__ import annotations

from .common import CODE_HINTS_AFTER, CheckError
from .l00_setup_and_data import check_circle_coverage, check_items_until_every_class, check_parse_caption
from .l01_forward_diffusion import check_add_noise, check_log_snr, check_snr_one_time, check_v_target
from .l02_patch_embedding import (
    check_linear_as_conv,
    check_nearest_is_neighbour,
    check_patchify,
    check_sincos_2d,
    check_unpatchify,
)
from .l03_attention import check_attention, check_masked_attention, check_peak_weight, check_split_heads
from .l04_uvit import (
    check_run_blocks,
    check_skip_fusion,
    check_skip_parameter_fraction,
    check_timestep_embedding,
)
from .l05_adaln_zero import check_dit_block, check_gate, check_modulate, check_zero_grad_fraction
from .l06_training_loop import (
    check_cfg_training_loss,
    check_clip_grad_norm,
    check_ema_half_life,
    check_ema_update,
    check_lr_at,
)
from .l07_samplers import check_ddim_step, check_ddpm_step, check_dpm_solver_2m_step, check_sampler_error
from .l08_guidance import check_adherence_at, check_cfg_rescale, check_guidance
from .l09_clip_text import (
    check_bpe_merge,
    check_chance_accuracy,
    check_clip_loss,
    check_eos_pool,
    check_retrieval_accuracy,
)
from .l10_latent_diffusion import (
    check_db_per_halving,
    check_latent_scale,
    check_psnr,
    check_psnr_per_image,
    check_vae_kl,
    check_vae_sample,
)
from .l11_udit import check_flop_ratio, check_fold_kernels, check_split_subgrids
from .l13_evaluation import check_frechet_distance, check_kid, check_real_fid
from .l14_guidance_editing import (
    check_classifier_guided,
    check_fixed_point_inversion_step,
    check_round_trip_error,
)
from .l15_flow_matching import check_heun_step, check_midpoint_step, check_path_straightness

CHECKERS = {
    "parse_caption": check_parse_caption,
    "circle_coverage": check_circle_coverage,
    "items_until_every_class": check_items_until_every_class,
    "add_noise": check_add_noise,
    "log_snr": check_log_snr,
    "v_target": check_v_target,
    "snr_one_time": check_snr_one_time,
    "patchify": check_patchify,
    "unpatchify": check_unpatchify,
    "sincos_2d": check_sincos_2d,
    "linear_as_conv": check_linear_as_conv,
    "nearest_is_neighbour": check_nearest_is_neighbour,
    "attention": check_attention,
    "split_heads": check_split_heads,
    "masked_attention": check_masked_attention,
    "peak_weight": check_peak_weight,
    "skip_fusion": check_skip_fusion,
    "timestep_embedding": check_timestep_embedding,
    "run_blocks": check_run_blocks,
    "skip_parameter_fraction": check_skip_parameter_fraction,
    "modulate": check_modulate,
    "gate": check_gate,
    "dit_block": check_dit_block,
    "zero_grad_fraction": check_zero_grad_fraction,
    "ema_update": check_ema_update,
    "lr_at": check_lr_at,
    "cfg_training_loss": check_cfg_training_loss,
    "clip_grad_norm": check_clip_grad_norm,
    "ema_half_life": check_ema_half_life,
    "ddim_step": check_ddim_step,
    "dpm_solver_2m_step": check_dpm_solver_2m_step,
    "ddpm_step": check_ddpm_step,
    "sampler_error": check_sampler_error,
    "guidance": check_guidance,
    "cfg_rescale": check_cfg_rescale,
    "adherence_at": check_adherence_at,
    "clip_loss": check_clip_loss,
    "retrieval_accuracy": check_retrieval_accuracy,
    "eos_pool": check_eos_pool,
    "bpe_merge": check_bpe_merge,
    "chance_accuracy": check_chance_accuracy,
    "vae_sample": check_vae_sample,
    "vae_kl": check_vae_kl,
    "latent_scale": check_latent_scale,
    "psnr": check_psnr,
    "psnr_per_image": check_psnr_per_image,
    "db_per_halving": check_db_per_halving,
    "split_subgrids": check_split_subgrids,
    "fold_kernels": check_fold_kernels,
    "flop_ratio": check_flop_ratio,
    "frechet_distance": check_frechet_distance,
    "kid": check_kid,
    "real_fid": check_real_fid,
    # lessons 14, 15: graded hints (hint=2 for code)
    "classifier_guided": check_classifier_guided,
    "fixed_point_inversion_step": check_fixed_point_inversion_step,
    "round_trip_error": check_round_trip_error,
    "heun_step": check_heun_step,
    "midpoint_step": check_midpoint_step,
    "path_straightness": check_path_straightness,
}

# every checker by its own name (check_<task>), as imported above
__all__ = ["CHECKERS", "CODE_HINTS_AFTER", "CheckError", *(fn.__name__ for fn in CHECKERS.values())]
