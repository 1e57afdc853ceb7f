// Records a hash of the console's sources in dist/SOURCES.sha256 after a build, or (with
// --check) tells whether the committed dist was built from the sources as they are now.
// The Rust test `fieldline-console::bundle_matches_sources` runs the same comparison in
// `cargo test`, so a source change without `make console` fails the build's tests.
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';

const root = new URL('..', import.meta.url).pathname;
const inputs = ['index.html', 'package-lock.json', 'tsconfig.json', 'vite.config.ts', 'src'];

function files(path) {
  const full = join(root, path);
  if (statSync(full).isDirectory()) return readdirSync(full).sort().flatMap((name) => files(join(path, name)));
  return [path];
}

const hash = createHash('sha256');
for (const file of inputs.flatMap(files).sort()) {
  hash.update(relative(root, join(root, file)).replaceAll('\\', '/') + '\n');
  hash.update(readFileSync(join(root, file)));
  hash.update('\n');
}
const digest = hash.digest('hex');
const stamp = join(root, 'dist', 'SOURCES.sha256');
if (process.argv.includes('--check')) {
  const recorded = readFileSync(stamp, 'utf8').trim();
  if (recorded !== digest) {
    console.error(`console/dist was built from other sources (${recorded} != ${digest}): run make console`);
    process.exit(1);
  }
  console.log('console/dist matches its sources');
} else {
  writeFileSync(stamp, digest + '\n');
}
