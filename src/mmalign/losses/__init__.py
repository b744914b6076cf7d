"""mmalign.losses"""
