"""Cluster mode: many nodes behind one Lambda API, coordinated through etcd.

Without ``warmstart serve --cluster`` none of this runs and a node is the single node it
always was (state in SQLite).  With it, etcd holds what every node must agree on --
members and their published state, functions and revisions, queued Event invocations and
jobs with the claims nodes hold on them -- and every node answers every API call,
running an invocation where it starts fastest or forwarding it there in one hop.
"""
