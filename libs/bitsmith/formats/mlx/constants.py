"""Every name and number of mlx-lm's quantized safetensors layout (FORMATS.md §6), in one place."""

from __future__ import annotations

from bitsmith.formats.gptq.constants import COPIED_FILES as GPTQ_COPIED_FILES

QUANTIZATION_KEY = "quantization"
"""mlx-lm's own block in config.json: global `group_size`/`bits`/`mode`, plus an entry per module path
whose parameters differ; mlx-lm quantizes a module iff it has an entry or `<module>.scales` exists."""
QUANTIZATION_CONFIG_KEY = "quantization_config"
"""mlx-lm writes an identical copy under this key."""
MODE = "affine"
"""w = scales·q + biases, q in [0, 2^bits); bitsmith's zero points become biases = -scales·zeros."""

BITS = (2, 3, 4, 8)
"""Widths both mlx (2/3/4/5/6/8) and bitsmith's solvers (2/3/4/8) have."""
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
WORD_BITS = 32
"""Codes are one little-endian bit stream per row, cut into uint32 words (3-bit values straddle words)."""

DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
"""Writer variants: the model dtype of scales, biases and every float tensor (safetensors dtype string)."""
DEFAULT_DTYPE = "float16"
ST_UINT32 = "U32"

WEIGHTS_FILE = "model.safetensors"
METADATA = {"format": "mlx"}
CONFIG_FILE = "config.json"
COPIED_FILES = GPTQ_COPIED_FILES

WEIGHT = "weight"
SCALES = "scales"
BIASES = "biases"
BIAS = "bias"

ZERO_TOLERANCE = 0.25
"""Reading zeros back: -biases/scales must lie this close to an integer (float16 rounding of a bias
moves it by at most zero·2^-11 ≤ 0.125 for 8-bit), or the biases are not a bitsmith zero-point grid."""
