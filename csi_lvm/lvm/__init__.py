"""The only code that runs LVM, one module per layer.

- ``records``: typed LV and VG records decoded from LVM's JSON reports, and
  ``lv_attr`` decoded into named states;
- ``errors``: LVM's failures as LVM-domain errors (no gRPC here: the
  translation into statuses happens once, in ``csi_lvm.errors``);
- ``process``: one ``lvm`` process per command, never killed mid-command;
- ``shell``: the long-lived ``lvm`` shell protocol (``LVM_REPORT_FD``);
- ``commands``: the verbs; every LVM command line is built there.

Nothing in this package imports the rest of csi-lvm: it knows LVM, not CSI.
"""
