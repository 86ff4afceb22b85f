"""diffgap"""
