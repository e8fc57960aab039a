"""Tasks the toy transformers are trained on (currently Dyck-3, see ``polymorph.tasks.dyck``)."""
