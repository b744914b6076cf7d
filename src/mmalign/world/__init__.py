"""mmalign.world"""
