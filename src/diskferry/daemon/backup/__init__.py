"""Backups of libvirt domains: a pull-mode job behind tickets.

One call begins libvirt's pull-mode backup of a running domain and
serves each disk's point-in-time export under a ticket of its own::

    backup start DOMAIN --> checks (running, qcow2 disks, the checkpoint
                            to start from, no other job)
                        --> RUN_DIR/backups/JOB/ (QEMU may write it):
                            backup.xml, checkpoint.xml, scratch files,
                            the NBD socket
                        --> virsh backup-begin, a new checkpoint
                        --> one read ticket per disk on
                            nbd:unix:SOCKET:exportname=DISK (dirty when
                            incremental)
    ticket end      --> the disk is released; the last one ends the job
    backup stop     --> the job's tickets removed (in-flight requests end
                        first), then the job ends
    domain stops    --> the job ends (a pidfd of the QEMU serving it);
                        its tickets answer 410 until removed
    job end         --> virsh domjobabort, the folder removed

A shut off domain has no QEMU to serve a job: its disk files are served
as format tickets are, by the daemon's own qemu-nbd, and the daemon makes
the checkpoint itself (``offline``). ``backup prune`` deletes a
domain's older checkpoints, running or shut off (``prune``).

A disk's ``TicketExport`` is the job's: when its ticket is deleted, or
expires while idle, or the daemon stops, the disk is released and the
job ends with its last disk. A job that ended does not start again: the
ticket then fails with a message saying so.
"""
