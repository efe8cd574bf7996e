"""veofast.data"""
