# Copyright 2025 The enat-diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""Helpers for tests and benchmarks that run ENAT models with random weights."""

import torch

from .models.transformer_enat import ENATTransformer2DModel

__all__ = ["randomize_modulation"]


@torch.no_grad()
def randomize_modulation(
    transformer: ENATTransformer2DModel, std: float = 0.02, class_embedding_std: float = 1.0
) -> ENATTransformer2DModel:
    """
    Give the adaLN modulation of every block (and the class embedding of class-conditional models) random values.

    A freshly built transformer has zero-initialised adaLN, which makes every block an identity map: its logits do not
    depend on most of the network, so numerical comparisons and timings of random models would not reflect a trained
    one. Draws from the global torch generator (seed it first); returns the same `transformer`.

    Args:
        transformer (`ENATTransformer2DModel`): Changed in place.
        std (`float`, defaults to 0.02): Standard deviation of the adaLN weights and biases.
        class_embedding_std (`float`, defaults to 1.0): Standard deviation of the class embedding.
    """
    for block in transformer.blocks:
        block.adaln_modulation.weight.normal_(0, std)
        block.adaln_modulation.bias.normal_(0, std)
    if transformer.is_class_conditional:
        transformer.class_embedding.weight.normal_(0, class_embedding_std)
    return transformer
