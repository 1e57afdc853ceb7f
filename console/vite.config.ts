import { defineConfig } from 'vite';

// The bundle is embedded in the `fieldline` binary (crates/console): plain files in dist/,
// hashed names under assets/, no source maps.
export default defineConfig({
  base: '/',
  oxc: { jsx: { runtime: 'automatic', importSource: 'preact' } },
  build: {
    outDir: 'dist',
    assetsDir: 'assets',
    sourcemap: false,
    emptyOutDir: true,
    chunkSizeWarningLimit: 300,
  },
  server: {
    proxy: { '/api': 'http://127.0.0.1:8080' },
  },
});
