"""tfds builders of video datasets; each writes the example schema of ttt_jax/data/features.py.

`tomjerry_storyboard`: a user's folder of annotated cartoons (ttt_jax/data/annotations.py).
`toy_toons`: synthetic cartoons with facts a metric can check.

Import a builder's module to register it with tfds; this package imports none of them, so that
importing one does not pay for the others.
"""
