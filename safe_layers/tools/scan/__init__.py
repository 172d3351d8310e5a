"""``safe-layers scan``: :mod:`.command` runs it.

    command        the command line (--help is its docstring)
    targets        what is scanned: a Target, and what kind of source a path is
    net_targets    the sources a net or solver prototxt names (SL930)
    datum_records  Datum records of an LMDB or LevelDB (SL901-SL907)
    hdf5_sources   HDF5Data sources: list files and .h5 datasets (SL920-SL926)
    label_stats    label histogram, absent classes, label order (SL904, SL910-SL912)
    source_report  what the scan of one source gathered
    label_plot     ``--plot``

Each rule registers in :mod:`safe_layers.tools.rule_table` where its check lives; its doc
cites BVLC Caffe 1.0 (git 99bd997) as file:line.
"""
