"""cloaklab's work: pure functions and small modules, no CLI or terminal code.

Tensors at every boundary are float images in [0, 1] shaped ``(B, 3, H, W)`` unless a docstring says otherwise.
"""
