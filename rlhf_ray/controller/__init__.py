"""Distributed plumbing: Ray start-up, placement plans, worker groups. Jobs call it; it holds no algorithm."""
