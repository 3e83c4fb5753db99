"""The built-in models, one module each, imported by the registry only when its name is asked for.

Importing one of these modules registers nothing; its ``register()`` function
does (the registry calls it the first time the name is looked up). Nothing heavy
is imported before the model is built: scikit-learn only by the digits data
helpers, ``transformers`` only by the MiniLM builder, a weights file only by
``get_model`` loading it.
"""
