"""The pipelines vidsparse ships, built with nothing downloaded.

Tiny random-weight pipelines of every family's real diffusers classes (:mod:`.tiny`), and the project's own trained
text-to-video model, ``tiny-shapes`` (:mod:`.shapes`), with what it is made of: its pixel-space "VAE"
(:mod:`.pixel_vae`), x0-predicting sampler (:mod:`.flow_x0`), absolute position features (:mod:`.positions`),
in-memory text encoders (:mod:`.text`) and the procedural clips it was trained on (:mod:`.procedural`, also the
eval's prompt-following data).

The family adapters (``pipelines/wan.py``, ...) never import from here; the trainers
(:mod:`vidsparse.pipelines.training`), the loader (:mod:`vidsparse.pipelines.loading`) and the tests do.
"""
