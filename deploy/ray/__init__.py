"""Tandem on a Ray cluster: `ray job submit --working-dir . -- python -m deploy.ray.launch ...`.

`launch` is the job's driver (plan, start, watch, stop); `actors` holds the one actor class,
`ManagedProcess`, that runs one Tandem process (or etcd) on its node and takes it down with
it. See deploy/ray/README.md for the commands.
"""
