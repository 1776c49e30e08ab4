"""The only code that runs LVM, one module per layer.

- ``errors``: LVM's failures as LVM-domain errors (no gRPC here: the
  translation into statuses happens once, in ``csi_lvm.errors``);
- ``names``: the names LVM accepts, and the device-mapper names it makes;
- ``records``: typed LV and VG records decoded from LVM's JSON reports,
  ``lv_attr`` decoded into named states, and a thin pool's kernel status;
- ``journal``: which LVs the driver's changes named, counted;
- ``process``: one process per command, never killed mid-command;
- ``shell``: the long-lived ``lvm`` shell protocol (``LVM_REPORT_FD``);
- ``runner``: the one runner of ``lvm``, ``dmsetup`` and the thin tools
  (prefix, environment, config overrides, time limits, shell or process,
  failures classified);
- ``commands``: the verbs; every LVM command line is built there;
- ``thin_metadata``: the verbs of a thin pool's own metadata (messages to
  the pool, the thin tools' listings), over the same runner.

Nothing in this package imports the rest of csi-lvm: it knows LVM, not CSI.
"""
