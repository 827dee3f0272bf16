"""blurflow inside napari (npe2 manifest ``napari.yaml``): readers of blurflow's outputs
(:mod:`.readers`) and dock widgets that run predict, particles and tracks (:mod:`.widgets`).
Needs the optional extra: ``pip install 'blurflow[napari]'``."""
