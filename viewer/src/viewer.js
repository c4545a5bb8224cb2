// The review app's image viewer: the study as the PACS holds it, in Cornerstone3D, beside the report.
//
// The page names a study description (JSON) in #viewer's data-study: its series and their instances (each a
// URL the review app serves from the PACS, DICOM Part 10), and which instance the model read; or, for an
// image attached in FHIR, the picture the model read. Left drag: window/level; middle drag: pan; right drag:
// zoom; wheel: scroll the series. Buttons do the same for keyboard users and tests.
import {
  Enums,
  RenderingEngine,
  imageLoader,
  init as initCore,
  metaData,
} from "@cornerstonejs/core";
import { init as initLoader } from "@cornerstonejs/dicom-image-loader";
import {
  Enums as ToolEnums,
  PanTool,
  StackScrollTool,
  ToolGroupManager,
  WindowLevelTool,
  ZoomTool,
  addTool,
  init as initTools,
} from "@cornerstonejs/tools";

// Window presets as centre/width in the image's own units (after the modality LUT).
const PRESETS = {
  lung: { center: -600, width: 1500 },
  mediastinum: { center: 40, width: 400 },
  bone: { center: 300, width: 1500 },
};

const element = document.getElementById("viewer");
const status = document.getElementById("viewer-status");
const marker = document.getElementById("read-marker");
const position = document.getElementById("viewer-position");

function say(text) {
  status.textContent = text;
}

async function pngImageId(url) {
  // An image attached in FHIR (PNG or JPEG as the model read it): decoded by the browser, shown as greyscale.
  const picture = new Image();
  picture.src = url;
  await picture.decode();
  const canvas = document.createElement("canvas");
  canvas.width = picture.naturalWidth;
  canvas.height = picture.naturalHeight;
  const context = canvas.getContext("2d");
  context.drawImage(picture, 0, 0);
  const rgba = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const grey = new Uint8Array(canvas.width * canvas.height);
  for (let i = 0; i < grey.length; i += 1) grey[i] = rgba[4 * i];
  const imageId = `medgemma-attachment:${url}`;
  const image = imageLoader.createAndCacheLocalImage(imageId, {
    scalarData: grey,
    dimensions: [canvas.width, canvas.height],
    spacing: [1, 1, 1],
    origin: [0, 0, 0],
    direction: [1, 0, 0, 0, 1, 0, 0, 0, 1],
    frameOfReferenceUID: "medgemma-attachment",
  });
  // A local image comes with a zero window, and the viewport reads the window from the image and from the
  // metadata below: without both it draws the picture black.
  image.windowCenter = 127.5;
  image.windowWidth = 255;
  return imageId;
}

// What DICOM metadata would say of an attached picture: an 8-bit greyscale image, shown over its range.
const ATTACHMENT_METADATA = {
  generalSeriesModule: { modality: "OT", seriesInstanceUID: "medgemma-attachment" },
  modalityLutModule: { rescaleSlope: 1, rescaleIntercept: 0 },
  voiLutModule: { windowCenter: [127.5], windowWidth: [255] },
};

function attachmentMetadata(type, imageId) {
  return imageId.startsWith("medgemma-attachment:") ? ATTACHMENT_METADATA[type] : undefined;
}

function instanceImageId(instance) {
  return `wadouri:${new URL(instance.url, window.location.href).href}`;
}

async function main() {
  const staticBase = new URL(element.dataset.static, window.location.href).href;
  await initCore();
  initTools();
  initLoader({ maxWebWorkers: 1, wasmBasePath: staticBase });
  metaData.addProvider(attachmentMetadata, 10000);

  const study = await (await fetch(element.dataset.study, { credentials: "same-origin" })).json();
  const engine = new RenderingEngine("review");
  engine.enableElement({ viewportId: "study", type: Enums.ViewportType.STACK, element });
  const viewport = engine.getViewport("study");

  [WindowLevelTool, PanTool, ZoomTool, StackScrollTool].forEach(addTool);
  const tools = ToolGroupManager.createToolGroup("review");
  const { MouseBindings } = ToolEnums;
  const bindings = [
    [WindowLevelTool, MouseBindings.Primary],
    [PanTool, MouseBindings.Auxiliary],
    [ZoomTool, MouseBindings.Secondary],
    [StackScrollTool, MouseBindings.Wheel],
  ];
  for (const [tool, mouseButton] of bindings) {
    tools.addTool(tool.toolName);
    tools.setToolActive(tool.toolName, { bindings: [{ mouseButton }] });
  }
  tools.addViewport("study", "review");

  let seriesIndex = 0;
  const series = study.series;
  const readId =
    study.read && study.read.instance_url ? instanceImageId({ url: study.read.instance_url }) : null;

  function showPosition() {
    const current = viewport.getCurrentImageId();
    const index = viewport.getCurrentImageIdIndex();
    const count = viewport.getImageIds().length;
    const label = series.length ? series[seriesIndex].label : "attached image";
    position.textContent = `${label}: image ${index + 1} of ${count}`;
    const isRead = series.length ? current === readId : true;
    marker.hidden = !isRead;
    element.dataset.current = current;
    element.dataset.read = String(isRead);
  }

  async function showSeries(index, imageIndex = 0) {
    seriesIndex = (index + series.length) % series.length;
    const ids = series[seriesIndex].instances.map(instanceImageId);
    await viewport.setStack(ids, Math.min(imageIndex, ids.length - 1));
    viewport.render();
    showPosition();
  }

  function readPlace() {
    // Where the model read: its series, and its instance in that series.
    const inSeries = Math.max(0, series.findIndex((s) => s.uid === study.read?.series));
    const at = series[inSeries].instances.findIndex((i) => i.uid === study.read?.instance);
    return [inSeries, Math.max(0, at)];
  }

  if (series.length) {
    await showSeries(...readPlace());
  } else {
    await viewport.setStack([await pngImageId(study.image)], 0);
    viewport.render();
    showPosition();
  }
  element.addEventListener(Enums.Events.STACK_NEW_IMAGE, showPosition);

  const actions = {
    "zoom-in": () => viewport.setZoom(viewport.getZoom() * 1.25),
    "zoom-out": () => viewport.setZoom(viewport.getZoom() / 1.25),
    "pan-left": () => {
      const [x, y] = viewport.getPan();
      viewport.setPan([x - 40, y]);
    },
    "pan-right": () => {
      const [x, y] = viewport.getPan();
      viewport.setPan([x + 40, y]);
    },
    reset: () => {
      viewport.resetCamera();
      viewport.resetProperties();
    },
    "next-image": () => viewport.scroll(1),
    "previous-image": () => viewport.scroll(-1),
    "next-series": () => series.length && showSeries(seriesIndex + 1),
    "previous-series": () => series.length && showSeries(seriesIndex - 1),
    "show-read": () => series.length && showSeries(...readPlace()),
  };
  for (const [name, { center, width }] of Object.entries(PRESETS)) {
    actions[`window-${name}`] = () =>
      viewport.setProperties({ voiRange: { lower: center - width / 2, upper: center + width / 2 } });
  }
  for (const button of document.querySelectorAll("[data-viewer-action]")) {
    button.addEventListener("click", async () => {
      await actions[button.dataset.viewerAction]();
      viewport.render();
      showPosition();
    });
  }
  say("ready");
  element.dataset.ready = "true";
}

main().catch((error) => {
  say(`The viewer could not show the study: ${error && error.message ? error.message : error}`);
  element.dataset.ready = "failed";
});
