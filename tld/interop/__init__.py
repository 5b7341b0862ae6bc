"""Other codebases' models as tld models, and tld models for them (lessons 04, 05, 10, 11, 12).

- ``load_diffusers_dit`` / ``to_diffusers_dit``: diffusers' ``DiTTransformer2DModel`` in and out
  (``tld.interop.diffusers_dit``), so a tld DiT samples through ``DiTPipeline``.
- ``load_official`` / ``to_official``: the released checkpoints of U-ViT, DiT, U-DiT and TLD in
  their reference layouts (``tld.interop.official``; key names and shapes in ``KEYS.md``).
- ``official_sample_or_explain``: the lessons' "sample from the real weights" cell
  (``tld.interop.lessons``): samples on a GPU with the files present, else says which file to get
  from where.

Nothing here downloads; diffusers and transformers are imported only when a function needs them.
"""

from .diffusers_dit import load_diffusers_dit, to_diffusers_dit
from .lessons import official_sample_or_explain
from .official import (
    OFFICIAL,
    OfficialFile,
    check_layout,
    identify,
    load_official,
    official_shapes,
    read_state_dict,
    to_official,
)

__all__ = ["load_diffusers_dit", "to_diffusers_dit", "load_official", "to_official", "official_shapes", "check_layout",
           "read_state_dict", "identify", "OFFICIAL", "OfficialFile", "official_sample_or_explain"]
