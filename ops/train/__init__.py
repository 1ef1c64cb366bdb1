"""The training library: the shared loop (:mod:`.loop`), the trainables (:mod:`.textual_inversion`,
:mod:`.dreambooth_model`), DreamBooth surrogates for the set-level poisons (:mod:`.dreambooth`), data and presets.
The commands' runs over a folder are :mod:`ops.commands.train_ti` and :mod:`ops.commands.train_db`."""
