"""The bottom layer: small helpers every other layer may use, and that import nothing of ``i2p``.

``files``: hashing, atomic writes, the per-user cache directory, the image-extension list.
``tables``: the plain-text tables every command prints.
"""
