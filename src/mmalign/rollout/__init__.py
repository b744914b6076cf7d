"""mmalign.rollout"""
