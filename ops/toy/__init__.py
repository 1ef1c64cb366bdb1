"""The toy world: a procedural captioned shape dataset, a project-trained tiny SD-architecture model
(``--model toy``), and a classifier that plays DINOv2/CLIP for it (``cloak score --metrics toy-acc,toy-sim``).

Where the toy weights live (and their hash) is :mod:`ops.models.toy_weights`, with the other model loaders.
"""
